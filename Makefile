# modpipe — plain GNU make.
#   make            build build/modpipe
#   make test       unit tests (CUnit) + multi-rank tests (mpirun)
#   make demo       install deps, build, make a demo model, run a 4-rank pipeline
#   make SANITIZE=1 test   the same under AddressSanitizer + UBSan (objects in build-asan/)

ifeq ($(SANITIZE),1)
  B        := build-asan
  SANFLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
  OPT      := -O1 -g
else
  B        := build
  SANFLAGS :=
  OPT      := -O2 -g
endif

PKGS    := ompi-c openblas libprotobuf-c yaml-0.1 libcjson libpcre2-8
CC      := gcc
CFLAGS  := -std=c11 -Wall -Wextra -Werror -D_GNU_SOURCE $(OPT) $(SANFLAGS) -MMD -MP \
           $(shell pkg-config --cflags $(PKGS) 2>/dev/null) -I. -I$(B)/proto
LDLIBS  := $(shell pkg-config --libs $(PKGS) 2>/dev/null) -lm
LDFLAGS := $(SANFLAGS)
CUNIT   := $(shell pkg-config --libs cunit 2>/dev/null)

PROTO_SRC := $(B)/proto/modpipe.pb-c.c
PROTO_HDR := $(B)/proto/modpipe.pb-c.h

STAGE_SRC   := $(wildcard stage/*.c)
TRAIN_SRC   := $(wildcard train/*.c)
COMM_SRC    := $(wildcard comm/*.c)
CLUSTER_SRC := $(filter-out cluster/main.c,$(wildcard cluster/*.c))
TOK_SRC     := $(wildcard tok/*.c)
LIB_OBJ     := $(patsubst %.c,$(B)/%.o,$(STAGE_SRC) $(TRAIN_SRC) $(COMM_SRC) $(CLUSTER_SRC) $(TOK_SRC)) $(B)/proto/modpipe.pb-c.o
TEST_SRC    := $(wildcard tests/test_*.c)
TEST_BIN    := $(patsubst tests/%.c,$(B)/tests/%,$(TEST_SRC))

all: $(B)/modpipe
.PHONY: all test demo clean bench

$(B)/proto/modpipe.pb-c.c $(B)/proto/modpipe.pb-c.h: proto/modpipe.proto
	@mkdir -p $(B)/proto
	protoc-c --proto_path=proto --c_out=$(B)/proto proto/modpipe.proto

$(B)/proto/modpipe.pb-c.o: $(B)/proto/modpipe.pb-c.c
	$(CC) $(filter-out -Werror -Wextra,$(CFLAGS)) -c $< -o $@

# Every object may include the generated header.
$(B)/%.o: %.c $(PROTO_HDR)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(B)/libmodpipe.a: $(LIB_OBJ)
	ar rcs $@ $^

$(B)/modpipe: $(B)/cluster/main.o $(B)/libmodpipe.a
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

$(B)/tests/%: $(B)/tests/%.o $(B)/libmodpipe.a
	$(CC) $(LDFLAGS) $^ $(LDLIBS) $(CUNIT) -o $@

# ---- tests --------------------------------------------------------------
# OMPI_MCA_rmaps_base_oversubscribe lets the mpi tests start more ranks than cores.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export OPENBLAS_NUM_THREADS ?= 1
ifeq ($(SANITIZE),1)
  # Open MPI's own allocations are reported as leaks; the tests check our memory errors.
  export ASAN_OPTIONS := detect_leaks=0:abort_on_error=1
  export UBSAN_OPTIONS := print_stacktrace=1:halt_on_error=1
endif

# Each test program exits non-zero when any assertion failed; test_pipeline runs the built
# binary under mpirun (-np 1..4).
# tests/scripts/run.sh checks the benchmark scripts' own logic (CSV rows, netns cleanup; needs
# root): it runs once, in the plain build (the sanitizer pass re-checks the C code only).
test: $(TEST_BIN) $(B)/modpipe
	@set -e; for t in $(TEST_BIN); do echo "== $$t"; MODPIPE=$(B)/modpipe $$t; done
ifneq ($(SANITIZE),1)
	@bash tests/scripts/run.sh $(B)/modpipe
endif
	@echo "== all tests passed"

# ---- demo ---------------------------------------------------------------
DEMO_NP ?= 4
demo:
	@sh scripts/install-deps
	@$(MAKE) --no-print-directory all
	@sh scripts/demo $(B)/modpipe $(DEMO_NP)

bench: $(B)/modpipe
	@bash scripts/bench-engine --bin $(B)/modpipe --out docs/BENCH.md

clean:
	rm -rf build build-asan

-include $(shell find $(B) -name '*.d' 2>/dev/null)
