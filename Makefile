# skyapi: `make run` to try it, `make test` to test it. Both install what is
# missing first (Debian packages: etcd-server, etcd-client, protobuf-compiler,
# openssl, which the TLS tests use to make certificates, prometheus for
# promtool, systemd for systemd-socket-activate and systemd-analyze).

SHELL := /bin/bash
CARGO ?= cargo
ETCD_PORT ?= 2379
LISTEN ?= :8053
RUN_DIR := target/run
APT_PKGS := etcd-server etcd-client protobuf-compiler

.PHONY: all deps build release run test test-static lint check clean-run static deb fuzz soak bench chaos

all: build

# Installs the Debian packages the build and the tests need, if missing.
deps:
	@missing=""; \
	command -v etcd >/dev/null 2>&1 || missing="$$missing etcd-server"; \
	command -v etcdctl >/dev/null 2>&1 || missing="$$missing etcd-client"; \
	command -v protoc >/dev/null 2>&1 || missing="$$missing protobuf-compiler"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v systemd-socket-activate >/dev/null 2>&1 || missing="$$missing systemd"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing >/dev/null || exit 1; \
	fi
	@command -v $(CARGO) >/dev/null 2>&1 || { echo "cargo not found: install Rust with rustup (https://rustup.rs)"; exit 1; }

build: deps
	$(CARGO) build

release: deps
	$(CARGO) build --release

# Starts a throwaway etcd on 127.0.0.1:$(ETCD_PORT) (data under $(RUN_DIR)),
# or uses the one already answering there, then skyapi on $(LISTEN).
# Ctrl-C stops both: skyapi first (a restart-safe stop: its entries stay
# until its lease expires), then etcd, which runs in its own session so the
# terminal's SIGINT does not reach it first.
run: release
	@mkdir -p $(RUN_DIR); \
	etcd_pid=""; \
	if ETCDCTL_API=3 etcdctl --endpoints=127.0.0.1:$(ETCD_PORT) --command-timeout=1s endpoint health >/dev/null 2>&1; then \
	  echo "using the etcd already answering on 127.0.0.1:$(ETCD_PORT)"; \
	else \
	  echo "starting a throwaway etcd on 127.0.0.1:$(ETCD_PORT) (data in $(RUN_DIR)/etcd, log in $(RUN_DIR)/etcd.log)"; \
	  rm -rf $(RUN_DIR)/etcd; \
	  setsid etcd --name skyapi-run --data-dir $(RUN_DIR)/etcd \
	    --listen-client-urls http://127.0.0.1:$(ETCD_PORT) --advertise-client-urls http://127.0.0.1:$(ETCD_PORT) \
	    --listen-peer-urls http://127.0.0.1:$$(( $(ETCD_PORT) + 1 )) \
	    --initial-advertise-peer-urls http://127.0.0.1:$$(( $(ETCD_PORT) + 1 )) \
	    --initial-cluster skyapi-run=http://127.0.0.1:$$(( $(ETCD_PORT) + 1 )) >$(RUN_DIR)/etcd.log 2>&1 & \
	  etcd_pid=$$!; \
	  for i in $$(seq 50); do \
	    ETCDCTL_API=3 etcdctl --endpoints=127.0.0.1:$(ETCD_PORT) --command-timeout=1s endpoint health >/dev/null 2>&1 && break; \
	    sleep 0.2; \
	  done; \
	fi; \
	trap '[ -n "$$etcd_pid" ] && kill $$etcd_pid 2>/dev/null; wait' EXIT INT TERM; \
	echo "skyapi on $(LISTEN); try: websocat 'ws://127.0.0.1:8053/provide?service=foo&port=9999'"; \
	./target/release/skyapi --listen-addr $(LISTEN) --etcd-api http://127.0.0.1:$(ETCD_PORT) $(ARGS)

# Ends with one line adding up every test binary's summary, so the total is
# the last thing printed (cargo's own last summary is a binary with no tests;
# the `#[ignore]`d soak variants are run by `make soak`).
# The package first: tests/systemd.rs installs it (dpkg -i) and checks it.
# If it cannot be built, the other tests still run and the package tests
# fail saying so.
# The 45-second chaos run in it replays one fixed schedule (CHAOS_TEST_SEED),
# so a failure is reproducible and CI judges the same run every time;
# `make chaos` draws a new seed each run to explore.
CHAOS_TEST_SEED ?= 3
test: deps
	@$(MAKE) --no-print-directory deb || echo "make deb failed: the package tests in tests/systemd.rs will fail"
	@mkdir -p target
	set -o pipefail; SKYAPI_CHAOS_SEED=$${SKYAPI_CHAOS_SEED:-$(CHAOS_TEST_SEED)} \
	  $(CARGO) test --all-targets --no-fail-fast 2>&1 | tee target/test.log
	@awk '/^test result:/ { p += $$4; f += $$6 } END { printf "tests: %d passed, %d failed\n", p, f }' target/test.log

# The suites that start skyapi, run against the shipped static binary
# instead of the debug build (SKYAPI_TEST_BIN).
test-static: static
	SKYAPI_TEST_BIN=$(CURDIR)/$(STATIC_BIN) $(CARGO) test --test registrar --test continuity --test faults --test operate --test hostile

lint: deps
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

check: lint test

clean-run:
	rm -rf $(RUN_DIR)

# A fully static, stripped binary: x86_64-unknown-linux-musl, rustls/ring,
# no OpenSSL. Needs musl-tools (ring's C code) and the musl target.
STATIC_TARGET := x86_64-unknown-linux-musl
STATIC_BIN := target/$(STATIC_TARGET)/release/skyapi
static: deps
	@command -v musl-gcc >/dev/null 2>&1 || { \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq musl-tools >/dev/null; }
	@rustup target list --installed 2>/dev/null | grep -q $(STATIC_TARGET) || rustup target add $(STATIC_TARGET)
	$(CARGO) build --release --target $(STATIC_TARGET)
	strip $(STATIC_BIN)
	@file $(STATIC_BIN)
	@ls -l $(STATIC_BIN) | awk '{ printf "size: %.1f MiB\n", $$5 / 1048576 }'

# The Debian package, from the static binary: $(DEB) with /usr/bin/skyapi,
# the units under /lib/systemd/system, /etc/default/skyapi (a conffile)
# and the alert rules. cargo-deb comes from crates.io if missing.
DEB_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
DEB := target/debian/skyapi_$(DEB_VERSION)_amd64.deb
deb: static
	@command -v cargo-deb >/dev/null 2>&1 || $(CARGO) install cargo-deb --locked
	$(CARGO) deb --no-build --no-strip --target $(STATIC_TARGET) --output $(DEB)
	@dpkg-deb --info $(DEB) | sed -n 's/^ \(Package\|Version\|Installed-Size\):/\1:/p'

# Fuzzes the /provide query parser and key builder for FUZZ_SECONDS
# (cargo-fuzz on the nightly toolchain; installed if missing).
FUZZ_SECONDS ?= 60
fuzz:
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	cd fuzz && $(CARGO) +nightly fuzz run provide_query -- -max_total_time=$(FUZZ_SECONDS)

# The long-running variants of the fault and resource tests (minutes).
soak: deps
	$(CARGO) test --release -- --ignored --test-threads=1

# The chaos run (tests/chaos.rs, README "Chaos run"): DURATION seconds of
# seeded random faults (etcd members killed, skyapi partitioned, stalled and
# restarted, clients churning) against a 3-member etcd and two instances,
# with the promise checked every 100 ms. SEED replays a run (random if
# empty). The summary line is printed last, also when the run fails.
DURATION ?= 300
SEED ?=
chaos: deps
	@mkdir -p target
	@set -o pipefail; SKYAPI_CHAOS_SECONDS=$(DURATION) SKYAPI_CHAOS_SEED=$(SEED) \
	  $(CARGO) test --test chaos random_faults_keep_the_promise -- --nocapture 2>&1 | tee target/chaos.log; \
	  status=$$?; grep '^chaos: seed [0-9]*,' target/chaos.log | tail -1; exit $$status

# Measures issues 4 and 10 with examples/loadgen.rs against throwaway etcds
# and skyapi on free loopback ports, and writes BENCHMARKS.md (about 15-20
# minutes on 2 cores: the fleet scenarios take most of it; BENCH_ARGS, e.g.
# `BENCH_ARGS=--only=latency,idle`, runs fewer). The headline binary is the
# shipped one, the static musl build (`make static`); latency and idle also
# run on the glibc build beside it. The builds are separate so each measured
# skyapi is exactly what `make static` / `cargo build --release` makes
# (dev-dependency features stay out of it).
bench: deps static
	$(CARGO) build --release
	$(CARGO) build --release --example loadgen
	python3 bench/bench.py --skyapi $(STATIC_BIN) --skyapi-glibc target/release/skyapi $(BENCH_ARGS)
