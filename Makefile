# modpipe — plain GNU make.
#   make            build build/modpipe
#   make test       unit tests (CUnit) + multi-rank tests (mpirun)
#   make demo       install deps, build, make a demo model, run a 4-rank pipeline
#   make SANITIZE=1 test   the same under AddressSanitizer + UBSan (objects in build-asan/)
#   make bench-kernels     matmul / bandwidth micro-benchmark (tests/bench_kernels.c)

ifeq ($(SANITIZE),1)
  B        := build-asan
  SANFLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
  OPT      := -O1 -g
else
  B        := build
  SANFLAGS :=
  OPT      := -O2 -g
endif

PKGS    := ompi-c openblas libprotobuf-c yaml-0.1 libcjson libpcre2-8 libmicrohttpd icu-uc

# ---- build dependencies (a fresh machine: `make test` before `make demo`) ------------------------
# Checked on every make, cheaply (scripts/check-deps: `command -v` and pkg-config, no apt).
# When something is missing, root runs scripts/install-deps right away (before the flags
# below are computed from pkg-config); anyone else is told to run it. `make demo` installs
# itself, `make clean` needs nothing.
ifneq ($(filter-out clean demo,$(or $(MAKECMDGOALS),all)),)
  DEPS_MISSING := $(shell sh scripts/check-deps $(PKGS) cunit)
  ifneq ($(DEPS_MISSING),)
    ifeq ($(shell id -u),0)
      $(info make: missing $(DEPS_MISSING): running scripts/install-deps)
      DEPS_LOG := $(shell sh scripts/install-deps >&2)
      DEPS_MISSING := $(shell sh scripts/check-deps $(PKGS) cunit)
      ifneq ($(DEPS_MISSING),)
        $(error still missing after scripts/install-deps: $(DEPS_MISSING))
      endif
    else
      $(error missing $(DEPS_MISSING): run 'sudo sh scripts/install-deps' (or make demo), then make again)
    endif
  endif
endif

CC      := gcc
CFLAGS  := -std=c11 -Wall -Wextra -Werror -D_GNU_SOURCE $(OPT) $(SANFLAGS) -MMD -MP \
           $(shell pkg-config --cflags $(PKGS) 2>/dev/null) -I. -I$(B)/proto
# oneDNN (libdnnl-dev) ships no .pc file; Debian builds it on OpenMP (libgomp).
LDLIBS  := $(shell pkg-config --libs $(PKGS) 2>/dev/null) -lscalapack-openmpi -ldnnl -lgomp -lm
LDFLAGS := $(SANFLAGS)
CUNIT   := $(shell pkg-config --libs cunit 2>/dev/null)

PROTO_SRC := $(B)/proto/modpipe.pb-c.c
PROTO_HDR := $(B)/proto/modpipe.pb-c.h

# The layers, top-down (each may include only those below it; docs/ARCHITECTURE.md):
#   cli -> serve -> engine -> comm, train -> stage, tok -> base
BASE_SRC    := $(wildcard base/*.c)
STAGE_SRC   := $(wildcard stage/*.c)
TRAIN_SRC   := $(wildcard train/*.c)
COMM_SRC    := $(wildcard comm/*.c)
ENGINE_SRC  := $(wildcard engine/*.c)
TOK_SRC     := $(wildcard tok/*.c)
SERVE_SRC   := $(wildcard serve/*.c)
CLI_SRC     := $(filter-out cli/main.c,$(wildcard cli/*.c))
ALL_LIB_SRC := $(BASE_SRC) $(STAGE_SRC) $(TRAIN_SRC) $(COMM_SRC) $(ENGINE_SRC) $(TOK_SRC) $(SERVE_SRC) $(CLI_SRC)
LIB_OBJ     := $(patsubst %.c,$(B)/%.o,$(ALL_LIB_SRC)) $(B)/proto/modpipe.pb-c.o
TEST_SRC    := $(wildcard tests/test_*.c)
TEST_BIN    := $(patsubst tests/%.c,$(B)/tests/%,$(TEST_SRC))

all: $(B)/modpipe
.PHONY: all test demo clean format format-check bench bench-kernels fuzz-build fuzz-seeds

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
	rm -f $@; ar rcs $@ $^

$(B)/modpipe: $(B)/cli/main.o $(B)/libmodpipe.a
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

$(B)/tests/%: $(B)/tests/%.o $(B)/libmodpipe.a
	$(CC) $(LDFLAGS) $^ $(LDLIBS) $(CUNIT) -o $@

# test_http drives the HTTP layer against test doubles of the queue and the tokenizer
# (tests/serve/double_*.c); the end-to-end test tests/serve/run.sh uses the real ones.
SERVE_DOUBLES := $(B)/tests/serve/double_srvq.o $(B)/tests/serve/double_tok.o
$(B)/tests/test_http: $(B)/tests/test_http.o $(SERVE_DOUBLES) $(B)/libmodpipe.a
	$(CC) $(LDFLAGS) $^ $(LDLIBS) $(CUNIT) -lpthread -o $@

# ---- tests ---------------------------------------------------------------------------------------
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
test: $(TEST_BIN) $(B)/modpipe format-check
	@echo "== scripts/check-layers (include graph vs the layers, no module cycles)"
	@python3 scripts/check-layers
	@echo "== tests/tok/npm-ci.sh (the real Llama-3 / Qwen2.5 tokenizer.json files for test_tok)"
	@bash tests/tok/npm-ci.sh
	@set -e; for t in $(TEST_BIN); do echo "== $$t"; MODPIPE=$(B)/modpipe MODPIPE_TOK_REAL=1 $$t; done
	@echo "== $(B)/tests/test_kernels with ONEDNN_MAX_CPU_ISA=SSE41 (oneDNN's capped kernels)"
	@ONEDNN_MAX_CPU_ISA=SSE41 $(B)/tests/test_kernels
	@echo "== $(B)/tests/test_kernels with ONEDNN_MAX_CPU_ISA=AVX512_CORE (no bf16 kernels: the f32 conversion)"
	@ONEDNN_MAX_CPU_ISA=AVX512_CORE $(B)/tests/test_kernels
	@echo "== tests/serve/run.sh (modpipe serve with curl and the openai npm client)"
	@bash tests/serve/run.sh $(B)/modpipe
	@echo "== tests/serve/recover.sh (the front: kill -9 / SIGSTOP of a rank, replay)"
	@bash tests/serve/recover.sh $(B)/modpipe
	@echo "== tests/serve/spare.sh (--spare-hosts: a host counted dead, restart on a spare / fewer ranks; netcluster, root)"
	@bash tests/serve/spare.sh $(B)/modpipe
ifneq ($(SANITIZE),1)
	@bash tests/scripts/run.sh $(B)/modpipe
endif
	@echo "== all tests passed"

# Every C file follows .clang-format (clang-format 14, installed by scripts/install-deps) and
# every source file the one section-banner style (scripts/banners); `make format` rewrites them
# in place.
C_FILES = $(shell git ls-files '*.c' '*.h' 2>/dev/null)
format-check:
	@echo "== scripts/banners --check (one section-banner style)"
	@python3 scripts/banners --check
	@if command -v clang-format >/dev/null 2>&1; then \
	    echo "== clang-format --dry-run (style: .clang-format)"; \
	    clang-format --dry-run -Werror $(C_FILES); \
	else echo "== clang-format not installed: style not checked"; fi
format:
	python3 scripts/banners --fix
	clang-format -i $(C_FILES)

# ---- demo ----------------------------------------------------------------------------------------
DEMO_NP ?= 4
demo:
	@sh scripts/install-deps
	@$(MAKE) --no-print-directory all
	@sh scripts/demo $(B)/modpipe $(DEMO_NP)

bench: $(B)/modpipe
	@bash scripts/bench-engine --bin $(B)/modpipe --out docs/BENCH.md

# Kernel micro-benchmark (read bandwidth, decode GEMV, prefill vs cblas_sgemm): key=value lines.
# BENCH_KERNELS_ARGS e.g. "--threads 2 --quick".
bench-kernels: $(B)/tests/bench_kernels
	@$(B)/tests/bench_kernels $(BENCH_KERNELS_ARGS)

# ---- fuzzing (fuzz/README.md) --------------------------------------------------------------------
# libFuzzer targets fuzz/fuzz_*.c, built with clang under ASan + UBSan into build-fuzz/; the
# library is rebuilt there with coverage instrumentation. scripts/fuzz runs them.
FZ        := build-fuzz
FZ_CC     := clang
FZ_SAN    := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
# TOK_MAX_ID / TOK_NO_JIT: see tok/tok_impl.h, tok/tok.c (keep runs fast, same code paths).
FZ_CFLAGS := -std=c11 -Wall -Wextra -D_GNU_SOURCE -O1 -g $(FZ_SAN) -MMD -MP \
             -DTOK_MAX_ID=65536 -DTOK_NO_JIT \
             $(shell pkg-config --cflags $(PKGS) 2>/dev/null) -I. -I$(FZ)/proto
# The matmul kernels use CPU-feature builtins clang 14 rejects ("f16c"); no target needs them.
FZ_EXCLUDE := stage/matmul.c stage/matmul_x86.c
FZ_LIB_OBJ := $(patsubst %.c,$(FZ)/%.o,$(filter-out $(FZ_EXCLUDE),$(ALL_LIB_SRC))) \
              $(FZ)/proto/modpipe.pb-c.o
FZ_SRC    := $(wildcard fuzz/fuzz_*.c)
FZ_BIN    := $(patsubst fuzz/%.c,$(FZ)/%,$(FZ_SRC))

fuzz-build: $(FZ_BIN) $(FZ)/make_seeds

$(FZ)/proto/modpipe.pb-c.c $(FZ)/proto/modpipe.pb-c.h: proto/modpipe.proto
	@mkdir -p $(FZ)/proto
	protoc-c --proto_path=proto --c_out=$(FZ)/proto proto/modpipe.proto

$(FZ)/proto/modpipe.pb-c.o: $(FZ)/proto/modpipe.pb-c.c
	$(FZ_CC) $(filter-out -Wextra,$(FZ_CFLAGS)) -fsanitize=fuzzer-no-link -c $< -o $@

# Library objects: -Werror stays with the gcc build (clang warns differently).
$(FZ)/%.o: %.c $(FZ)/proto/modpipe.pb-c.h
	@mkdir -p $(dir $@)
	$(FZ_CC) $(FZ_CFLAGS) -fsanitize=fuzzer-no-link -c $< -o $@

$(FZ)/libmodpipe.a: $(FZ_LIB_OBJ)
	rm -f $@; ar rcs $@ $^

$(FZ)/fuzz_%: fuzz/fuzz_%.c fuzz/fuzz_util.h $(FZ)/libmodpipe.a
	$(FZ_CC) $(FZ_CFLAGS) -Werror -fsanitize=fuzzer $< $(FZ)/libmodpipe.a $(LDLIBS) -o $@

$(FZ)/make_seeds: fuzz/make_seeds.c $(FZ)/libmodpipe.a
	$(FZ_CC) $(FZ_CFLAGS) -Werror -fsanitize=fuzzer-no-link $< $(FZ)/libmodpipe.a $(LDLIBS) -o $@

# Regenerate the comm_unpack seeds (the other seeds are files: fuzz/README.md).
fuzz-seeds: $(FZ)/make_seeds
	@mkdir -p fuzz/corpus/comm_unpack
	$(FZ)/make_seeds fuzz/corpus/comm_unpack

clean:
	rm -rf build build-asan build-fuzz

-include $(shell find $(B) -name '*.d' 2>/dev/null)
ifneq ($(filter fuzz%,$(MAKECMDGOALS)),)
-include $(shell find $(FZ) -name '*.d' 2>/dev/null)
endif
