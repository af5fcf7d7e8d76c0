/* serve/http_util.c — histograms and replies of the HTTP server
 * (see serve/http_impl.h). */
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "serve/http_impl.h"

/* ---- Metrics --------------------------------------------------------------------------------- */

static const double BUCKETS[N_BUCKETS] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                          0.25,  0.5,    1.0,   2.5,  5.0,   10.0, 30.0};
void histo_add(histo *h, double v)
{
    int i = 0;
    while (i < N_BUCKETS && v > BUCKETS[i]) i++;
    h->count[i]++;
    h->n++;
    h->sum += v;
}

void histo_print(sb *b, const char *name, const char *help, const histo *h)
{
    sb_fmt(b, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    uint64_t cum = 0;
    for (int i = 0; i < N_BUCKETS; i++) {
        cum += h->count[i];
        sb_fmt(b, "%s_bucket{le=\"%g\"} %llu\n", name, BUCKETS[i], (unsigned long long)cum);
    }
    sb_fmt(b, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.6f\n%s_count %llu\n", name,
           (unsigned long long)h->n, name, h->sum, name, (unsigned long long)h->n);
}

const int HTTP_STATUSES[N_STATUS] = {200, 400, 401, 404, 405, 413, 500, 503};

void count_status(serve_server *s, int status)
{
    int i = 0;
    while (i < N_STATUS && HTTP_STATUSES[i] != status) i++;
    pthread_mutex_lock(&s->mu);
    s->status_count[i]++;
    pthread_mutex_unlock(&s->mu);
}

enum MHD_Result reply(serve_server *s, struct MHD_Connection *c, int status, const char *ctype,
                      const char *body, size_t len, const char *h1, const char *v1)
{
    struct MHD_Response *r =
        MHD_create_response_from_buffer(len, (void *)body, MHD_RESPMEM_MUST_COPY);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, "Content-Type", ctype);
    if (h1) MHD_add_response_header(r, h1, v1);
    enum MHD_Result ok = MHD_queue_response(c, (unsigned)status, r);
    MHD_destroy_response(r);
    count_status(s, status);
    return ok;
}

enum MHD_Result reply_json(serve_server *s, struct MHD_Connection *c, int status, sb *b)
{
    if (b->oom) return MHD_NO;
    return reply(s, c, status, "application/json", b->p ? b->p : "", b->n, NULL, NULL);
}

void error_json(sb *b, const char *msg, const char *type, const char *param, const char *code)
{
    sb_str(b, "{\"error\":{\"message\":");
    sb_json(b, msg, strlen(msg));
    sb_str(b, ",\"type\":");
    sb_json(b, type, strlen(type));
    sb_str(b, ",\"param\":");
    if (param && *param)
        sb_json(b, param, strlen(param));
    else
        sb_str(b, "null");
    sb_str(b, ",\"code\":");
    if (code)
        sb_json(b, code, strlen(code));
    else
        sb_str(b, "null");
    sb_str(b, "}}");
}

enum MHD_Result reply_error_h(serve_server *s, struct MHD_Connection *c, int status,
                              const char *msg, const char *param, const char *code, const char *h1,
                              const char *v1)
{
    const char *type = status == 401   ? "authentication_error"
                       : status >= 500 ? (status == 503 ? "unavailable_error" : "server_error")
                       : status == 404 ? "not_found_error"
                                       : "invalid_request_error";
    sb b = {0};
    error_json(&b, msg, type, param, code);
    struct MHD_Response *r =
        MHD_create_response_from_buffer(b.n, b.p ? b.p : (char *)"", MHD_RESPMEM_MUST_COPY);
    sb_free(&b);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, "Content-Type", "application/json");
    if (status == 503) MHD_add_response_header(r, "Retry-After", "1");
    if (status == 401) MHD_add_response_header(r, "WWW-Authenticate", "Bearer");
    if (h1) MHD_add_response_header(r, h1, v1);
    enum MHD_Result ok = MHD_queue_response(c, (unsigned)status, r);
    MHD_destroy_response(r);
    count_status(s, status);
    return ok;
}

enum MHD_Result reply_error(serve_server *s, struct MHD_Connection *c, int status, const char *msg,
                            const char *param, const char *code)
{
    return reply_error_h(s, c, status, msg, param, code, NULL, NULL);
}
