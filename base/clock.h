/* base/clock.h — the one clock: seconds on CLOCK_MONOTONIC (never jumps with the wall clock),
 * for durations, timeouts and rates. Thread-safe, no allocation. */
#ifndef BASE_CLOCK_H
#define BASE_CLOCK_H

double base_now_s(void);

#endif
