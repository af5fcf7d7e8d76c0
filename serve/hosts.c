/* serve/hosts.c — the front's hosts (contract in hosts.h). */
#include "serve/hosts.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <ifaddrs.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "base/err.h"

/* Append the hosts of one hostfile. */
static int load_file(serve_hosts *hs, const char *path, int spare, char *err, size_t errlen)
{
    const char *opt = spare ? "--spare-hosts" : "--hostfile";
    FILE *f = fopen(path, "r");
    if (!f) {
        base_set_err(err, errlen, "%s %s: %s", opt, path, strerror(errno));
        return -1;
    }
    char buf[1024];
    int ln = 0, rc = 0;
    while (!rc && fgets(buf, sizeof buf, f)) {
        ln++;
        size_t len = strlen(buf);
        if (len == sizeof buf - 1 && buf[len - 1] != '\n') {
            base_set_err(err, errlen, "%s %s:%d: the line is longer than %zu bytes", opt, path, ln,
                         sizeof buf - 2);
            rc = -1;
            break;
        }
        char *hash = strchr(buf, '#');
        if (hash) *hash = 0;
        len = strlen(buf);
        while (len > 0 && isspace((unsigned char)buf[len - 1])) buf[--len] = 0;
        char *s = buf;
        while (isspace((unsigned char)*s)) s++;
        if (!*s) continue;
        serve_host h;
        memset(&h, 0, sizeof h);
        h.spare = spare;
        h.slots = 1;
        size_t nl = strcspn(s, " \t"), n = strlen(s);
        if (nl >= sizeof h.name || n >= sizeof h.line) {
            base_set_err(err, errlen, "%s %s:%d: the host name or line is too long", opt, path, ln);
            rc = -1;
            break;
        }
        memcpy(h.name, s, nl);
        memcpy(h.line, s, n); /* h is zeroed: both stay terminated */
        const char *sl = strstr(s + nl, "slots=");
        if (sl && (sl == s + nl || isspace((unsigned char)sl[-1]))) {
            char *end;
            long v = strtol(sl + 6, &end, 10);
            if (end == sl + 6 || v < 1 || v > 1 << 20 || (*end && !isspace((unsigned char)*end))) {
                base_set_err(err, errlen, "%s %s:%d: slots= wants a whole number >= 1", opt, path,
                             ln);
                rc = -1;
                break;
            }
            h.slots = (int)v;
        }
        for (int i = 0; i < hs->n; i++)
            if (!strcmp(hs->h[i].name, h.name)) {
                base_set_err(err, errlen, "%s %s:%d: host %s is listed twice (also in %s)", opt,
                             path, ln, h.name, hs->h[i].spare ? "--spare-hosts" : "--hostfile");
                rc = -1;
            }
        if (rc) break;
        serve_host *g = realloc(hs->h, (size_t)(hs->n + 1) * sizeof *g);
        if (!g) {
            base_set_err(err, errlen, "out of memory (hosts)");
            rc = -1;
            break;
        }
        hs->h = g;
        hs->h[hs->n++] = h;
        if (!spare) hs->plan_slots += h.slots;
    }
    fclose(f);
    return rc;
}

int serve_hosts_load(serve_hosts *hs, const char *hostfile, const char *spares, char *err,
                     size_t errlen)
{
    memset(hs, 0, sizeof *hs);
    if (load_file(hs, hostfile, 0, err, errlen)) return -1;
    if (hs->n == 0) {
        base_set_err(err, errlen, "--hostfile %s: no host in it", hostfile);
        return -1;
    }
    if (spares && load_file(hs, spares, 1, err, errlen)) return -1;
    if (!serve_host_is_local(hs->h[0].name)) {
        base_set_err(err, errlen,
                     "--hostfile %s: its first host, %s, is not this machine; rank 0 runs on the "
                     "first host and talks to the front over a Unix socket, so list this host "
                     "first",
                     hostfile, hs->h[0].name);
        return -1;
    }
    return 0;
}

void serve_hosts_free(serve_hosts *hs)
{
    free(hs->h);
    memset(hs, 0, sizeof *hs);
}

/* 1 when the address is one of this machine's interfaces (or loopback). */
static int addr_is_local(const struct sockaddr *sa, const struct ifaddrs *ifs)
{
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)sa;
        if ((ntohl(a->sin_addr.s_addr) >> 24) == 127) return 1;
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)sa;
        if (IN6_IS_ADDR_LOOPBACK(&a->sin6_addr)) return 1;
    } else {
        return 0;
    }
    for (const struct ifaddrs *i = ifs; i; i = i->ifa_next) {
        if (!i->ifa_addr || i->ifa_addr->sa_family != sa->sa_family) continue;
        if (sa->sa_family == AF_INET &&
            ((const struct sockaddr_in *)i->ifa_addr)->sin_addr.s_addr ==
                ((const struct sockaddr_in *)sa)->sin_addr.s_addr)
            return 1;
        if (sa->sa_family == AF_INET6 &&
            !memcmp(&((const struct sockaddr_in6 *)i->ifa_addr)->sin6_addr,
                    &((const struct sockaddr_in6 *)sa)->sin6_addr, sizeof(struct in6_addr)))
            return 1;
    }
    return 0;
}

int serve_host_is_local(const char *name)
{
    char me[256] = "";
    if (!strcmp(name, "localhost")) return 1;
    if (!gethostname(me, sizeof me - 1)) {
        size_t n = strlen(name);
        /* "node1" for "node1.cluster": a short name as Open MPI compares them */
        if (!strcmp(me, name) || (!strncmp(me, name, n) && me[n] == '.')) return 1;
    }
    struct addrinfo hint, *res = NULL;
    memset(&hint, 0, sizeof hint);
    hint.ai_family = AF_UNSPEC;
    hint.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(name, NULL, &hint, &res) || !res) return 0;
    struct ifaddrs *ifs = NULL;
    if (getifaddrs(&ifs)) ifs = NULL;
    int local = 0;
    for (const struct addrinfo *r = res; r && !local; r = r->ai_next)
        local = addr_is_local(r->ai_addr, ifs);
    if (ifs) freeifaddrs(ifs);
    freeaddrinfo(res);
    return local;
}

/* The word after `key` in line into node [n]: 1, or 0. */
static int word_after(const char *line, const char *key, char *node, size_t n)
{
    const char *p = strstr(line, key);
    if (!p) return 0;
    p += strlen(key);
    while (*p == ' ' || *p == '\t') p++;
    size_t k = strcspn(p, " \t\r\n");
    while (k > 0 && (p[k - 1] == '.' || p[k - 1] == ',')) k--;
    if (!k || k >= n) return 0;
    memcpy(node, p, k);
    node[k] = 0;
    return 1;
}

int serve_hosts_blame(const char *line, char *node, size_t n)
{
    /* Open MPI 4 (mpirun) and 5 (prterun): "... noticed that process rank 1 with PID 42 on
     * node NAME exited on signal 9 (Killed)."; a lost daemon: "Remote daemon: [[x,0],1] on
     * node NAME"; a rank whose TCP peer vanished: "  Peer host:  NAME" */
    if (strstr(line, "noticed that process rank") || strstr(line, "Remote daemon"))
        return word_after(line, " on node ", node, n);
    return word_after(line, "Peer host:", node, n);
}

/* 1 when name resolves to the address text addr (numeric names resolve to themselves). */
static int resolves_to(const char *name, const char *addr)
{
    struct addrinfo hint, *res = NULL;
    memset(&hint, 0, sizeof hint);
    hint.ai_family = AF_UNSPEC;
    hint.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(name, NULL, &hint, &res) || !res) return 0;
    int hit = 0;
    for (const struct addrinfo *r = res; r && !hit; r = r->ai_next) {
        char a[INET6_ADDRSTRLEN] = "";
        if (r->ai_family == AF_INET)
            inet_ntop(AF_INET, &((const struct sockaddr_in *)r->ai_addr)->sin_addr, a, sizeof a);
        else if (r->ai_family == AF_INET6)
            inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)r->ai_addr)->sin6_addr, a, sizeof a);
        hit = a[0] && !strcmp(a, addr);
    }
    freeaddrinfo(res);
    return hit;
}

int serve_hosts_find(const serve_hosts *hs, const char *ident)
{
    char w[256];
    size_t k = strcspn(ident, " ");
    if (k == 0 || k >= sizeof w) return -1;
    memcpy(w, ident, k);
    w[k] = 0;
    for (int i = 0; i < hs->n; i++)
        if (!strcmp(hs->h[i].name, w)) return i;
    for (const char *p = ident + k; *p;) {
        while (*p == ' ') p++;
        k = strcspn(p, " ");
        if (k == 0 || k >= sizeof w) break;
        memcpy(w, p, k);
        w[k] = 0;
        p += k;
        for (int i = 0; i < hs->n; i++)
            if (resolves_to(hs->h[i].name, w)) return i;
    }
    return -1;
}

int serve_hosts_mark_dead(serve_hosts *hs, const char *node)
{
    for (int i = 1; i < hs->n; i++)
        if (!strcmp(hs->h[i].name, node)) {
            if (hs->h[i].dead) return -1;
            hs->h[i].dead = 1;
            return i;
        }
    return -1;
}

int serve_hosts_write(const serve_hosts *hs, int ranks, const char *path, int *out_ranks,
                      char *names, size_t n, char *err, size_t errlen)
{
    FILE *f = fopen(path, "w");
    if (!f) {
        base_set_err(err, errlen, "the job's hostfile %s: %s", path, strerror(errno));
        return -1;
    }
    int slots = 0;
    size_t used = 0;
    if (n) names[0] = 0;
    /* the plan's hosts left, then spares while the slots lost are not made up */
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < hs->n; i++) {
            const serve_host *h = &hs->h[i];
            if (h->dead || h->spare != pass || (pass && slots >= hs->plan_slots)) continue;
            fprintf(f, "%s\n", h->line);
            slots += h->slots;
            int k = snprintf(names + used, n - used, "%s%s", used ? ", " : "", h->name);
            if (k > 0 && (size_t)k < n - used) used += (size_t)k;
        }
    if (fclose(f)) {
        base_set_err(err, errlen, "the job's hostfile %s: %s", path, strerror(errno));
        return -1;
    }
    /* the first host is never dead, so slots >= 1 */
    long r = slots >= hs->plan_slots ? ranks : (long)ranks * slots / hs->plan_slots;
    *out_ranks = r < 1 ? 1 : (int)r;
    return 0;
}
