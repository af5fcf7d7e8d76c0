/* base/backoff.c — see base/backoff.h. */
#include "base/backoff.h"

#include <time.h>

#include "base/clock.h"

void base_backoff_init(base_backoff *b, base_backoff_kind kind, long spins, long nap_ns)
{
    b->kind = kind;
    b->spins = spins;
    b->calls = 0;
    b->nap_ns = b->cur_ns = nap_ns;
    b->t0 = kind == BASE_BACKOFF_IDLE ? base_now_s() : 0.0;
}

void base_backoff_wait(base_backoff *b)
{
    if (b->calls++ < b->spins) return;
    long ns = b->cur_ns;
    if (b->kind == BASE_BACKOFF_IDLE) {
        double waited = base_now_s() - b->t0;
        ns = waited < 0.01 ? b->nap_ns : waited < 0.2 ? 10 * b->nap_ns : 50 * b->nap_ns;
    } else if (b->kind == BASE_BACKOFF_DOUBLE && b->cur_ns < 1000000) {
        b->cur_ns *= 2;
    }
    struct timespec ts = {ns / 1000000000L, ns % 1000000000L};
    nanosleep(&ts, NULL);
}
