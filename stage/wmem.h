/* stage/wmem.h — weight memory on 2 MiB pages (docs/SPEC.md §9, "Where weights live").
 *
 * By default a stage reads its weight matrices in place from the safetensors mmap: zero-copy,
 * on the page cache's 4 KiB pages. Decode streams every weight once per token, and on 4 KiB
 * pages the CPU's stream prefetchers stop at every page boundary and every page costs a TLB
 * walk; on 2 MiB pages the same read runs faster (docs/BENCH.md). With huge pages asked for
 * (stage_wmem_set_huge, `--huge-pages`), the loader copies each matrix this stage holds into
 * an arena of anonymous memory advised MADV_HUGEPAGE (transparent huge pages) and lets go of
 * the mmap'd source pages it copied (madvise MADV_DONTNEED: the page cache keeps them, this
 * process's RSS does not), so memory stays one copy of the weights.
 *
 * Arena: chunks of at least 256 MiB of address space, 2 MiB-aligned, reserved with mmap and
 * filled by a bump pointer (64-byte aligned blocks): pages are only backed once written, so
 * the unused tail of the last chunk costs address space, not memory. Blocks are freed all at
 * once by stage_wmem_free. Not thread-safe (the loader is single-threaded).
 *
 * Errors: stage_wmem_alloc returns NULL when the address space cannot be had (the caller
 * reports "out of memory" naming the tensor). Where the kernel has transparent huge pages off
 * (/sys/kernel/mm/transparent_hugepage/enabled: [never]) stage_wmem_thp_state says so and the
 * caller keeps the mmap (a copy would gain nothing).
 */
#ifndef STAGE_WMEM_H
#define STAGE_WMEM_H

#include <stddef.h>

/* The process-wide choice (set once from the command line, before models load). */
void stage_wmem_set_huge(int on);
int stage_wmem_huge(void);

/* 1 when the kernel can back madvised memory with huge pages ("always" or "madvise"), 0 when
 * it cannot ("never", or no THP at all); why (the sysfs value) in buf. */
int stage_wmem_thp_state(char *buf, size_t len);
/* The same, read from `path` in place of /sys/kernel/mm/transparent_hugepage/enabled. */
int stage_wmem_thp_state_at(const char *path, char *buf, size_t len);

typedef struct stage_wmem stage_wmem;
stage_wmem *stage_wmem_new(void);    /* NULL when out of memory */
void stage_wmem_free(stage_wmem *a); /* NULL: no-op; every block is gone */
/* bytes (> 0) of 64-byte aligned memory, zero-filled, valid until stage_wmem_free; NULL when
 * the memory cannot be had */
void *stage_wmem_alloc(stage_wmem *a, size_t bytes);
size_t stage_wmem_used(const stage_wmem *a); /* bytes handed out, alignment included */
/* bytes of the arena the kernel backs with huge pages now (/proc/self/smaps AnonHugePages of
 * the arena's chunks); 0 when that file cannot be read */
size_t stage_wmem_huge_bytes(const stage_wmem *a);

/* Drop this process's mapping of the whole 4 KiB pages inside [p, p + n) of a read-only file
 * mapping whose bytes were copied out (they fault back in from the page cache if read). */
void stage_wmem_release_source(const void *p, size_t n);

#endif
