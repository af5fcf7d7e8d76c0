/* base/backoff.h — the one spin-then-sleep wait, for polling loops (MPI_Test and the like).
 *
 * A poll loop calls base_backoff_wait after each unsuccessful test: the first `spins` calls
 * return at once (latency matters when the answer is microseconds away), later ones sleep:
 *   BASE_BACKOFF_FIXED   nap_ns every time
 *   BASE_BACKOFF_DOUBLE  nap_ns, doubling up to 1 ms (a peer that may be busy for long)
 *   BASE_BACKOFF_IDLE    by the time waited since init: nap_ns below 10 ms, 10 x nap_ns below
 *                        0.2 s, 50 x nap_ns after (an idle server rank: no core spun, still
 *                        prompt once work comes)
 * No allocation; the state is the caller's (one per wait).
 */
#ifndef BASE_BACKOFF_H
#define BASE_BACKOFF_H

typedef enum { BASE_BACKOFF_FIXED, BASE_BACKOFF_DOUBLE, BASE_BACKOFF_IDLE } base_backoff_kind;

typedef struct {
    base_backoff_kind kind;
    long spins, calls;
    long nap_ns, cur_ns;
    double t0;
} base_backoff;

void base_backoff_init(base_backoff *b, base_backoff_kind kind, long spins, long nap_ns);
void base_backoff_wait(base_backoff *b);

#endif
