/* serve/hosts.h — the front's hosts: `--hostfile F [--spare-hosts G]` (docs/SERVE.md §5).
 *
 * serve_hosts_load parses two Open MPI hostfiles (a line: `NAME [slots=K] [more words]`, `#`
 * starts a comment; a line without slots= counts 1 slot) into one list: the plan's hosts,
 * then the spares (spares may be NULL: none). The first plan host must be this machine —
 * rank 0 talks to the front over a Unix socket — or it returns -1 with one line in err.
 *
 * When a job fails, serve_hosts_blame reads mpirun's messages (its stderr, as the front
 * relays it) and names the host the failure happened on ("process rank R ... on node NAME",
 * "Remote daemon ... on node NAME", a rank's "Peer host: NAME" when its TCP peer vanished);
 * serve_hosts_mark_dead counts it dead (never the first
 * host: it is the front's own). serve_hosts_write then writes the hostfile of the next job:
 * the plan hosts left, then spares in order until the slots lost are made up, and says how
 * many ranks the job gets: the plan's rank count while the slots suffice, otherwise fewer in
 * proportion to the slots left (at least 1) — the caller re-partitions for that count.
 *
 * Ownership: the list is the caller's (serve_hosts_free). No threads, no allocation after
 * load. Errors: -1 with a message via base_set_err.
 */
#ifndef SERVE_HOSTS_H
#define SERVE_HOSTS_H

#include <stddef.h>

typedef struct {
    char name[256]; /* as the hostfile spells it (mpirun names a remote node so) */
    char line[512]; /* the hostfile line without its comment, passed on verbatim */
    int slots;      /* slots=K, 1 when not given */
    int spare;      /* from --spare-hosts */
    int dead;       /* a failure was attributed to it */
} serve_host;

typedef struct {
    serve_host *h; /* [n] plan hosts first, then spares */
    int n;
    int plan_slots; /* slots of the plan hosts, the capacity to keep */
} serve_hosts;

int serve_hosts_load(serve_hosts *hs, const char *hostfile, const char *spares, char *err,
                     size_t errlen);
void serve_hosts_free(serve_hosts *hs);

/* 1 when name is this machine: "localhost", its hostname, or an address of one of its
 * interfaces (names are resolved). */
int serve_host_is_local(const char *name);

/* The host a line of mpirun's output blames, copied into node [n]: 1, or 0 when it blames none. */
int serve_hosts_blame(const char *line, char *node, size_t n);

/* The host a job's rank runs on: ident is the rank's "HOSTNAME ADDR ADDR ..." (serve/chan.h
 * RANKS); the first host whose name is HOSTNAME or resolves to one of the ADDRs. Its index,
 * or -1 (none matches). */
int serve_hosts_find(const serve_hosts *hs, const char *ident);

/* Count the host named node dead: its index, or -1 (not a host of the list, already dead, or
 * the first host). */
int serve_hosts_mark_dead(serve_hosts *hs, const char *node);

/* Write the next job's hostfile to path and its rank count (the plan's: ranks) to *out_ranks;
 * names [n] gets the hosts, comma-separated, for the log. -1 with err when no host is left or
 * the file cannot be written. */
int serve_hosts_write(const serve_hosts *hs, int ranks, const char *path, int *out_ranks,
                      char *names, size_t n, char *err, size_t errlen);

#endif
