/* tests/testutil.h — helpers shared by the CUnit test programs (header-only: each test is
 * its own binary). */
#ifndef TESTS_TESTUTIL_H
#define TESTS_TESTUTIL_H

#include <CUnit/CUnit.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* A fresh /tmp/modpipe-TAG-XXXXXX directory (malloc'd path), or NULL. */
static inline char *make_tmpdir_tagged(const char *tag)
{
    char *t = malloc(64);
    if (!t) return NULL;
    snprintf(t, 64, "/tmp/modpipe-%s-XXXXXX", tag);
    if (!mkdtemp(t)) {
        free(t);
        return NULL;
    }
    return t;
}

/* Remove a temp dir of plain files and free its path (NULL-safe). */
static inline void rm_tmpdir(char *dir)
{
    if (!dir) return;
    DIR *d = opendir(dir);
    if (d) {
        struct dirent *e;
        char path[1024];
        while ((e = readdir(d))) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            unlink(path);
        }
        closedir(d);
    }
    rmdir(dir);
    free(dir);
}

/* Assert that an error message contains `needle`, printing both when it does not. */
#define ASSERT_HAS(msg, needle)                                                            \
    do {                                                                                   \
        int has_ = strstr((msg), (needle)) != NULL;                                        \
        if (!has_) fprintf(stderr, "\n  message \"%s\" lacks \"%s\"\n", (msg), (needle)); \
        CU_ASSERT(has_);                                                                   \
    } while (0)

#endif
