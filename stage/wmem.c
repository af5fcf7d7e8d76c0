/* stage/wmem.c — see wmem.h. */
#include "stage/wmem.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define HUGE_PAGE ((size_t)2 << 20)
#define CHUNK_MIN ((size_t)256 << 20) /* address space per chunk, at least */

static int g_huge;

void stage_wmem_set_huge(int on) { g_huge = on != 0; }
int stage_wmem_huge(void) { return g_huge; }

int stage_wmem_thp_state(char *buf, size_t len)
{
    return stage_wmem_thp_state_at("/sys/kernel/mm/transparent_hugepage/enabled", buf, len);
}

int stage_wmem_thp_state_at(const char *path, char *buf, size_t len)
{
    char line[256] = "";
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(buf, len, "no transparent huge pages in this kernel");
        return 0;
    }
    if (!fgets(line, sizeof line, f)) line[0] = 0;
    fclose(f);
    line[strcspn(line, "\n")] = 0;
    snprintf(buf, len, "transparent_hugepage/enabled: %s", line);
    return strstr(line, "[always]") || strstr(line, "[madvise]");
}

typedef struct {
    char *base; /* HUGE_PAGE-aligned */
    size_t len, used;
} wchunk;

struct stage_wmem {
    wchunk *c; /* [n], the last one filled */
    int n, cap;
    size_t used;
};

stage_wmem *stage_wmem_new(void) { return calloc(1, sizeof(stage_wmem)); }

void stage_wmem_free(stage_wmem *a)
{
    if (!a) return;
    for (int i = 0; i < a->n; i++) munmap(a->c[i].base, a->c[i].len);
    free(a->c);
    free(a);
}

/* A chunk of at least `need` bytes: mmap'd one huge page larger than asked, so the aligned
 * part can be cut out (the rest unmapped). */
static int chunk_add(stage_wmem *a, size_t need)
{
    if (a->n == a->cap) {
        int cap = a->cap ? 2 * a->cap : 8;
        wchunk *c = realloc(a->c, (size_t)cap * sizeof *c);
        if (!c) return -1;
        a->c = c;
        a->cap = cap;
    }
    size_t len = need > CHUNK_MIN ? need : CHUNK_MIN;
    len = (len + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;
    char *raw = mmap(NULL, len + HUGE_PAGE, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED) return -1;
    char *base = (char *)(((uintptr_t)raw + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
    if (base > raw) munmap(raw, (size_t)(base - raw));
    size_t tail = (size_t)(raw + len + HUGE_PAGE - (base + len));
    if (tail) munmap(base + len, tail);
    madvise(base, len, MADV_HUGEPAGE); /* advice: refused, the chunk is still memory */
    a->c[a->n++] = (wchunk){.base = base, .len = len, .used = 0};
    return 0;
}

void *stage_wmem_alloc(stage_wmem *a, size_t bytes)
{
    if (!a || bytes == 0 || bytes > SIZE_MAX - 2 * HUGE_PAGE) return NULL;
    size_t want = (bytes + 63) / 64 * 64;
    if (!a->n || a->c[a->n - 1].len - a->c[a->n - 1].used < want)
        if (chunk_add(a, want)) return NULL;
    wchunk *c = &a->c[a->n - 1];
    void *p = c->base + c->used;
    c->used += want;
    a->used += want;
    return p;
}

size_t stage_wmem_used(const stage_wmem *a) { return a ? a->used : 0; }

size_t stage_wmem_huge_bytes(const stage_wmem *a)
{
    if (!a || !a->n) return 0;
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f) return 0;
    char line[512];
    size_t total = 0;
    int in = 0; /* the current VMA starts inside one of our chunks */
    while (fgets(line, sizeof line, f)) {
        unsigned long lo, hi, kb;
        if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2 && strchr(line, '-') < strchr(line, ' ')) {
            in = 0;
            for (int i = 0; i < a->n && !in; i++)
                in = (char *)(uintptr_t)lo >= a->c[i].base &&
                     (char *)(uintptr_t)lo < a->c[i].base + a->c[i].len;
        } else if (in && sscanf(line, "AnonHugePages: %lu kB", &kb) == 1) {
            total += (size_t)kb << 10;
        }
    }
    fclose(f);
    return total;
}

void stage_wmem_release_source(const void *p, size_t n)
{
    const uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t lo = ((uintptr_t)p + pg - 1) & ~(pg - 1), hi = ((uintptr_t)p + n) & ~(pg - 1);
    if (hi > lo) madvise((void *)lo, (size_t)(hi - lo), MADV_DONTNEED);
}
