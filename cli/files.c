/* cli/files.c — see files.h. */
#include "cli/files.h"

#include "base/file.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int cli_mkdir_p(const char *dir, char *err, size_t errlen)
{
    char buf[PATH_MAX];
    snprintf(buf, sizeof buf, "%s", dir);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(buf, 0777) && errno != EEXIST) {
            snprintf(err, errlen, "cannot create %s: %s", buf, strerror(errno));
            return -1;
        }
        *p = '/';
    }
    if (mkdir(buf, 0777) && errno != EEXIST) {
        snprintf(err, errlen, "cannot create %s: %s", buf, strerror(errno));
        return -1;
    }
    return 0;
}

int cli_file_exists(const char *p)
{
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISREG(sb.st_mode);
}

int cli_write_text(const char *path, const char *text, char *err, size_t errlen)
{
    FILE *f = fopen(path, "w");
    if (!f || fputs(text, f) < 0 || fclose(f)) {
        snprintf(err, errlen, "cannot write %s: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

int cli_copy_file(const char *src, const char *dst, char *err, size_t errlen)
{
    size_t len = 0;
    char *buf = base_read_file(src, 0, &len, NULL, 0);
    if (!buf) {
        snprintf(err, errlen, "cannot read %s", src);
        return -1;
    }
    FILE *f = fopen(dst, "wb");
    int ok = f && fwrite(buf, 1, len, f) == len;
    if (f && fclose(f)) ok = 0;
    free(buf);
    if (!ok) {
        snprintf(err, errlen, "cannot write %s: %s", dst, strerror(errno));
        return -1;
    }
    return 0;
}

int cli_copy_side_files(const char *src, const char *dst, char *err, size_t errlen)
{
    static const char *extra[] = {"tokenizer.json", "tokenizer_config.json",
                                  "special_tokens_map.json", "generation_config.json",
                                  "tokenizer.model"};
    for (size_t i = 0; i < sizeof extra / sizeof extra[0]; i++) {
        char s[PATH_MAX], d[PATH_MAX];
        snprintf(s, sizeof s, "%s/%s", src, extra[i]);
        snprintf(d, sizeof d, "%s/%s", dst, extra[i]);
        if (cli_file_exists(s) && cli_copy_file(s, d, err, errlen)) return -1;
    }
    return 0;
}
