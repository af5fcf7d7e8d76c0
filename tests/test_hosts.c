/* tests/test_hosts.c — the front's hosts (serve/hosts.h): hostfiles parsed and refused, the
 * host mpirun's messages blame, the next job's hostfile and rank count after hosts die, the
 * host of a rank's identity and the stage a stalled pipeline waits for.
 * tests/serve/spare.sh runs the same end to end on scripts/netcluster.
 */
#include <CUnit/Basic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/sched.h"
#include "serve/hosts.h"

static char dir[64];

static const char *file(const char *name, const char *text)
{
    static char path[4][128];
    static int k;
    char *p = path[k++ % 4];
    snprintf(p, 128, "%s/%s", dir, name);
    FILE *f = fopen(p, "w");
    fputs(text, f);
    fclose(f);
    return p;
}

static char *slurp(const char *path)
{
    static char buf[1024];
    FILE *f = fopen(path, "r");
    size_t n = f ? fread(buf, 1, sizeof buf - 1, f) : 0;
    if (f) fclose(f);
    buf[n] = 0;
    return buf;
}

static void test_load(void)
{
    serve_hosts hs;
    char err[512];
    const char *plan = file("plan", "# the plan\nlocalhost slots=2 max_slots=4\n\n  b.example "
                                    "# one slot\nc.example slots=3\n");
    const char *spare = file("spare", "d.example slots=1\ne.example\n");
    CU_ASSERT_EQUAL(serve_hosts_load(&hs, plan, spare, err, sizeof err), 0);
    CU_ASSERT_EQUAL(hs.n, 5);
    CU_ASSERT_EQUAL(hs.plan_slots, 6);
    CU_ASSERT_STRING_EQUAL(hs.h[0].name, "localhost");
    CU_ASSERT_STRING_EQUAL(hs.h[0].line, "localhost slots=2 max_slots=4");
    CU_ASSERT_EQUAL(hs.h[0].slots, 2);
    CU_ASSERT_STRING_EQUAL(hs.h[1].line, "b.example");
    CU_ASSERT_EQUAL(hs.h[1].slots, 1);
    CU_ASSERT_EQUAL(hs.h[2].slots, 3);
    CU_ASSERT(!hs.h[2].spare && hs.h[3].spare && hs.h[4].spare);
    serve_hosts_free(&hs);

    /* refused, each with the file and line named */
    static const struct {
        const char *text, *want;
    } bad[] = {
        {"localhost slots=0\n", "plan:1: slots= wants a whole number >= 1"},
        {"localhost slots=2x\n", "slots= wants a whole number"},
        {"localhost\nb.example\nb.example slots=2\n", "plan:3: host b.example is listed twice"},
        {"# nothing\n\n", "no host in it"},
        {"b.example\nlocalhost\n", "its first host, b.example, is not this machine"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = 0;
        CU_ASSERT_EQUAL(serve_hosts_load(&hs, file("plan", bad[i].text), NULL, err, sizeof err),
                        -1);
        CU_ASSERT_PTR_NOT_NULL(strstr(err, bad[i].want));
        if (!strstr(err, bad[i].want)) printf("\n  case %zu: %s\n", i, err);
        serve_hosts_free(&hs);
    }
    /* a host name longer than serve_host.name holds */
    char longname[400];
    memset(longname, 'a', 300);
    snprintf(longname + 300, sizeof longname - 300, "\nlocalhost\n");
    CU_ASSERT_EQUAL(serve_hosts_load(&hs, file("plan", longname), NULL, err, sizeof err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "plan:1: the host name or line is too long"));
    serve_hosts_free(&hs);
    /* a spare that is also a plan host */
    CU_ASSERT_EQUAL(serve_hosts_load(&hs, file("plan", "localhost\nb.example\n"),
                                     file("spare", "b.example\n"), err, sizeof err),
                    -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "--spare-hosts"));
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "also in --hostfile"));
    serve_hosts_free(&hs);
    CU_ASSERT_EQUAL(serve_hosts_load(&hs, "/nonexistent/plan", NULL, err, sizeof err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "--hostfile /nonexistent/plan: "));
    serve_hosts_free(&hs);
}

static void test_local(void)
{
    char me[256] = "";
    gethostname(me, sizeof me - 1);
    CU_ASSERT(serve_host_is_local("localhost"));
    CU_ASSERT(serve_host_is_local("127.0.0.1"));
    CU_ASSERT(serve_host_is_local(me));
    CU_ASSERT(!serve_host_is_local("no-such-host.invalid"));
    CU_ASSERT(!serve_host_is_local("192.0.2.1")); /* TEST-NET-1: nobody's interface */
}

static void test_blame(void)
{
    char node[64];
    CU_ASSERT(serve_hosts_blame("mpirun noticed that process rank 1 with PID 22691 on node "
                                "10.77.0.2 exited on signal 9 (Killed).",
                                node, sizeof node));
    CU_ASSERT_STRING_EQUAL(node, "10.77.0.2");
    CU_ASSERT(serve_hosts_blame("prterun noticed that process rank 3 with PID 0 on node n7 "
                                "exited on signal 9 (Killed).",
                                node, sizeof node));
    CU_ASSERT_STRING_EQUAL(node, "n7");
    CU_ASSERT(serve_hosts_blame("  Remote daemon: [[15996,0],2] on node gpu3", node, sizeof node));
    CU_ASSERT_STRING_EQUAL(node, "gpu3");
    CU_ASSERT(serve_hosts_blame("  Peer host:  10.77.0.3", node, sizeof node));
    CU_ASSERT_STRING_EQUAL(node, "10.77.0.3");
    /* not blaming: the reporting side, other messages, a name too long for the buffer */
    CU_ASSERT(!serve_hosts_blame("  Local host: h0", node, sizeof node));
    CU_ASSERT(!serve_hosts_blame("modpipe serve: job: running on node b", node, sizeof node));
    CU_ASSERT(!serve_hosts_blame("  Peer host: ", node, sizeof node));
    CU_ASSERT(!serve_hosts_blame("  Peer host: a-very-long-host-name", node, 8));
}

static void test_write(void)
{
    serve_hosts hs;
    char err[512], names[256];
    const char *out = file("job", "");
    int ranks = 0;
    CU_ASSERT_EQUAL(serve_hosts_load(&hs, file("plan", "localhost\nb slots=1\nc slots=2\n"),
                                     file("spare", "d slots=1\ne slots=4\n"), err, sizeof err),
                    0);
    /* nothing dead: the plan's hosts, the plan's ranks (4 on 4 slots) */
    CU_ASSERT_EQUAL(serve_hosts_write(&hs, 4, out, &ranks, names, sizeof names, err, sizeof err),
                    0);
    CU_ASSERT_STRING_EQUAL(slurp(out), "localhost\nb slots=1\nc slots=2\n");
    CU_ASSERT_STRING_EQUAL(names, "localhost, b, c");
    CU_ASSERT_EQUAL(ranks, 4);
    /* the first host is the front's: never counted dead; unknown names neither */
    CU_ASSERT_EQUAL(serve_hosts_mark_dead(&hs, "localhost"), -1);
    CU_ASSERT_EQUAL(serve_hosts_mark_dead(&hs, "zz"), -1);
    /* c (2 slots) dies: spare d (1) is not enough, e (4) too is taken */
    CU_ASSERT_EQUAL(serve_hosts_mark_dead(&hs, "c"), 2);
    CU_ASSERT_EQUAL(serve_hosts_mark_dead(&hs, "c"), -1);
    CU_ASSERT_EQUAL(serve_hosts_write(&hs, 4, out, &ranks, names, sizeof names, err, sizeof err),
                    0);
    CU_ASSERT_STRING_EQUAL(slurp(out), "localhost\nb slots=1\nd slots=1\ne slots=4\n");
    CU_ASSERT_EQUAL(ranks, 4);
    /* e and d die: 2 of 4 slots left, so half the ranks */
    CU_ASSERT(serve_hosts_mark_dead(&hs, "e") > 0 && serve_hosts_mark_dead(&hs, "d") > 0);
    CU_ASSERT_EQUAL(serve_hosts_write(&hs, 4, out, &ranks, names, sizeof names, err, sizeof err),
                    0);
    CU_ASSERT_STRING_EQUAL(names, "localhost, b");
    CU_ASSERT_EQUAL(ranks, 2);
    /* b too: the front's host alone, one rank (never 0) */
    CU_ASSERT(serve_hosts_mark_dead(&hs, "b") > 0);
    CU_ASSERT_EQUAL(serve_hosts_write(&hs, 3, out, &ranks, names, sizeof names, err, sizeof err),
                    0);
    CU_ASSERT_STRING_EQUAL(slurp(out), "localhost\n");
    CU_ASSERT_EQUAL(ranks, 1);
    CU_ASSERT_EQUAL(
        serve_hosts_write(&hs, 3, "/nonexistent/job", &ranks, names, sizeof names, err, sizeof err),
        -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "the job's hostfile /nonexistent/job: "));
    serve_hosts_free(&hs);
}

static void test_find(void)
{
    serve_hosts hs;
    char err[512];
    /* numeric names only: no name service is asked */
    CU_ASSERT_EQUAL(serve_hosts_load(&hs, file("plan", "localhost\n10.9.8.7 slots=1\n"),
                                     file("spare", "10.9.8.8 slots=2\n"), err, sizeof err),
                    0);
    CU_ASSERT_EQUAL(serve_hosts_find(&hs, "h1 192.0.2.1 10.9.8.7"), 1); /* by an address */
    CU_ASSERT_EQUAL(serve_hosts_find(&hs, "h2 10.9.8.8"), 2);           /* a spare */
    CU_ASSERT_EQUAL(serve_hosts_find(&hs, "10.9.8.8 192.0.2.1"), 2);    /* by its name */
    CU_ASSERT_EQUAL(serve_hosts_find(&hs, "h3 192.0.2.1"), -1);
    CU_ASSERT_EQUAL(serve_hosts_find(&hs, ""), -1);
    CU_ASSERT_EQUAL(serve_hosts_find(&hs, " 10.9.8.7"), -1); /* no host name: not a rank's */
    serve_hosts_free(&hs);
}

static void test_stuck(void)
{
    /* 3 stages, micro-batch 7 the oldest in flight (want 8): stage 0 issued 10, stage 1
     * finished 9, stage 2 only 7 -> stage 2 holds it up */
    engine_stage_progress p[3] = {{0, 0, 10, 8, 0}, {1, 1, 9, 8, 0.1}, {2, 2, 7, 8, 4.0}};
    CU_ASSERT_EQUAL(engine_stuck_stage(p, 3), 2);
    p[1].mb_done = 7; /* stage 1 has not finished it either: the first in chain order */
    CU_ASSERT_EQUAL(engine_stuck_stage(p, 3), 1);
    p[1].mb_done = p[2].mb_done = 8; /* every stage did: the tokens are on their way */
    CU_ASSERT_EQUAL(engine_stuck_stage(p, 3), -1);
    for (int s = 0; s < 3; s++) p[s] = (engine_stage_progress){s, s, 0, 0, 0}; /* idle */
    CU_ASSERT_EQUAL(engine_stuck_stage(p, 3), -1);
    CU_ASSERT_EQUAL(engine_stuck_stage(p, 0), -1);
}

int main(void)
{
    snprintf(dir, sizeof dir, "/tmp/test-hosts-XXXXXX");
    if (!mkdtemp(dir)) return 1;
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("hosts", NULL, NULL);
    CU_add_test(s, "hostfiles: parsed, refused with the line named", test_load);
    CU_add_test(s, "this machine: localhost, hostname, interface addresses", test_local);
    CU_add_test(s, "the host mpirun's messages blame", test_blame);
    CU_add_test(s, "the next job's hosts and ranks as hosts die", test_write);
    CU_add_test(s, "the host of a rank's identity (name or address)", test_find);
    CU_add_test(s, "the stage a stalled pipeline waits for", test_stuck);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned fails = CU_get_number_of_failures();
    CU_cleanup_registry();
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd)) {}
    return fails != 0;
}
