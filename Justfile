# ironroot: the one entry point. `just --list` shows every recipe.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Install every external tool the tests, demo and benchmarks use (idempotent, cached).
deps:
    bash scripts/deps.sh

# The whole suite: unit tests and the real-peer tier (registry, cosign, mkcomposefs). Needs root.
# The binaries are built first: the real-peer tests run them, and `cargo test` alone builds
# only the binaries of packages that have integration tests of their own.
# `just image` comes first: the QEMU tier boots its kernel, agent and base module (and the
# generic kernel, for the bare-metal hardware tier).
test: deps
    bash scripts/image.sh >/dev/null
    target/release/ironroot-build kernel fetch --flavour generic --out target/kernel-generic >/dev/null
    cargo build --workspace --locked
    cargo test --workspace --locked

# The fast tier: formatting, lints and the unit tests of every crate (no root, no network, no
# QEMU; a few minutes). `just test` is the whole suite.
check:
    cargo fmt --all -- --check
    cargo clippy --all-targets --locked -- -D warnings
    cargo test --workspace --locked --lib --bins

# A node netboots the image in QEMU against the reference plane and a local registry and
# reaches `running` (exit 0 only then): `just lab` (unless it is up), `node provision`, teardown.
demo: deps
    bash scripts/demo.sh

# A lab on 127.0.0.1 that stays up: TLS registry, the image built, pushed and signed, the plane
# with the QEMU provider, template `base`; writes target/lab/env. `node provision` boots nodes.
# `just lab KERNEL=generic` boots the generic kernel's bundle (bare-metal NICs and disks).
lab *args: deps
    bash scripts/lab-up.sh {{args}}

# Stops what `just lab` started, by the PIDs it recorded (the plane powers off its VMs first).
lab-down:
    bash scripts/lab-down.sh

# Build everything a node boots into target/image: kernel, initramfs, cmdline, boot.ipxe, the
# signed base module, bundle.json. IRONROOT_REGISTRY=HOST:PORT/REPO also pushes and signs it.
# `just image KERNEL=generic`: Debian's generic kernel (bare metal) into target/image-generic.
image *args: deps
    bash scripts/image.sh {{args}}

# Benchmarks against their baselines, measured in the same run (ratios printed, not asserted).
# The product binaries build as one set (as image.sh and demo.sh do) so that cargo's feature
# unification does not give them a second build; the benchmark drivers build on their own.
bench: deps
    cargo build --release --locked -p ironroot-build -p ironroot-agent -p ironroot-plane
    cargo build --release --locked -p ironroot-tests --bins
    bash scripts/image.sh >/dev/null
    target/release/ironroot-build kernel fetch --flavour generic --out target/kernel-generic >/dev/null
    bash scripts/bench.sh
    bash scripts/bench-boot.sh

# Coverage-guided fuzzing of every parser that reads untrusted bytes (nightly + cargo-fuzz;
# not part of CI). SECONDS per target, default 60.
fuzz seconds="60":
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
    cd fuzz && for t in cmdline identity_doc smbios_oem pack_reader manifest_config audit_batch checkpoint node_journal wire; do \
        mkdir -p "corpus/$t" && cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- \
            -max_total_time={{seconds}} -rss_limit_mb=1024 || exit 1; done

# Minimize each target's corpus (what `just fuzz` found, with the seeds) into its committed
# seeds, which it replaces.
fuzz-seeds:
    cd fuzz && for t in cmdline identity_doc smbios_oem pack_reader manifest_config audit_batch checkpoint node_journal wire; do \
        mkdir -p "corpus/$t" "seeds/$t" && cp -n "seeds/$t"/* "corpus/$t"/ 2>/dev/null; \
        cargo +nightly fuzz cmin "$t" "corpus/$t" || exit 1; rm -f "seeds/$t"/*; cp "corpus/$t"/* "seeds/$t"/; done

# Release build of every binary.
build:
    cargo build --release --locked --workspace

fmt:
    cargo fmt --all

lint:
    cargo fmt --all -- --check
    cargo clippy --all-targets --locked -- -D warnings
