/* lamina_c.c: the driver protocol of conform/PROTOCOL.md (version 1):
 * `capabilities`, `dump IMAGE[@SNAP] OUT`, `check IMAGE`. */
#include "lamina.h"

#include <stdio.h>
#include <string.h>
#include <sys/resource.h>

static int usage(void)
{
    fprintf(stderr, "usage: lamina-c capabilities | dump IMAGE[@SNAP] OUT | check IMAGE\n");
    return LC_ERROR;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return usage();
    /* A chain may hold MAX_CHAIN_DEPTH files, all open at once. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "capabilities")) {
        if (argc != 2)
            return usage();
        printf("dump check shared-clusters\n"); /* commands, then the format features it reads */
        return 0;
    }
    if (!strcmp(cmd, "dump")) {
        if (argc != 4)
            return usage();
        int rc = cmd_dump(argv[2], argv[3]);
        if (rc)
            fprintf(stderr, "lamina-c: %s\n", lc_errmsg);
        return rc;
    }
    if (!strcmp(cmd, "check")) {
        if (argc != 3)
            return usage();
        return cmd_check(argv[2]);
    }
    fprintf(stderr, "lamina-c: %s: not a command this implementation offers\n", cmd);
    return LC_ERROR;
}
