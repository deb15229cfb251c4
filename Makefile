# ksmvm — the two commands a fresh machine needs are `make demo` and `make test`.
CARGO ?= cargo
PROBE := guest-image/probe/target/release/probe
KSMVM := target/vmm/ksmvm
BENCH := target/release/ksmvm-bench

.PHONY: all build ksmvm probe demo test test-probe test-linux test-cycles linux-lane fuzz lint fmt kernel clean

all: build

build: ksmvm
	$(CARGO) build --release --workspace
	$(MAKE) probe

# The shipped binary: profile `vmm` (LTO, panic=abort) linked as a static
# PIE (ASLR); see the profile's comment in Cargo.toml.
ksmvm:
	$(CARGO) rustc --profile vmm -p ksmvm --bin ksmvm -- \
		-C target-feature=+crt-static -C relocation-model=pie

# The probe guest: a freestanding kernel with its own linker flags.
probe:
	cd guest-image/probe && $(CARGO) build --release

# KSM density demo: 4 probe guests with the same memory profile; waits for
# KSM to merge them and prints each VM's resident and merged memory.
demo: build
	$(BENCH) demo --ksmvm $(KSMVM) --probe $(PROBE)

# Debian's cloud kernel for the Linux boot-protocol test (cached outside the repo).
kernel:
	guest-image/linux/fetch-debian-kernel.sh

# Both lanes (docs/testing.md): the probe lane on this host's /dev/kvm,
# then the real-Linux lane.
test: test-probe test-linux

test-probe: probe kernel
	$(CARGO) test --workspace -- --test-threads=2

# The real-Linux lane (tests/real_linux.rs, docs/testing.md): unmodified
# Linux guests to user space. Each test runs in a fresh test host (QEMU/TCG
# with AMD SVM, tests/testhost) or, on a host with vmx/svm, directly.
# TESTS=substring picks tests.
TESTS ?=
linux-lane:
	bash tests/testhost/prepare.sh >/dev/null
	bash guest-image/kernel/build-kernel.sh >/dev/null
	bash guest-image/linux/fetch-debian-kernel.sh >/dev/null
	bash guest-image/linux/make-test-initramfs.sh >/dev/null
	$(MAKE) -C guest-image rootfs MASTODON=0

test-linux: linux-lane
	$(CARGO) build --release -p ksmvm-testhost -p ksmvm --bin ksmvm-testhost --bin ksmvm
	bin="$$($(CARGO) test --release -p ksmvm --features real-linux --test real_linux --no-run 2>&1 | \
		sed -n 's/.*Executable .*(\(.*\))$$/\1/p')"; \
	test -x "$$bin" || { echo "cannot build tests/real_linux.rs" >&2; exit 1; }; \
	target/release/ksmvm-testhost suite $(if $(TESTS),--filter $(TESTS)) -- "$$bin"

# 1,000 start/stop cycles of a probe VM (tests/cycles.rs; KSMVM_CYCLES=N
# for another count): no process, TAP, socket or runtime file left behind,
# and the harness's fds, threads and memory unchanged. Needs root.
test-cycles: probe
	$(CARGO) test -p ksmvm --test cycles -- --ignored --nocapture

# Fuzz every virtio target for FUZZ_SECONDS each (not part of CI; needs
# `cargo install cargo-fuzz`). Figures per target: docs/fuzzing.md.
FUZZ_SECONDS ?= 60
fuzz:
	vmm/fuzz/run.sh $(FUZZ_SECONDS)

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p ksmvm --features real-linux --test real_linux -- -D warnings
	cd guest-image/probe && $(CARGO) fmt --check && $(CARGO) clippy --release -- -D warnings

fmt:
	$(CARGO) fmt --all
	cd guest-image/probe && $(CARGO) fmt

clean:
	$(CARGO) clean
	cd guest-image/probe && $(CARGO) clean
include vmm/systemd/install.mk
include benches/Makefile.inc
