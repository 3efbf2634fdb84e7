# ganomalyd: set-up, tests, demo, benchmarks.
#
#   make demo    run the daemon on the demo config (synthetic camera, bundled
#                model, embedded MQTT broker); Ctrl-C stops it
#   make test    install what the tests need, then run every test of the workspace
#   make lint    rustfmt --check, clippy -D warnings (all targets, whole workspace), cargo doc -D warnings
#   make bench   one table: raw ORT, pipeline at 1/4 cameras, Python peer, RSS, latency (figures)
#   make soak    1M frames, 4 cameras, two 20 s broker outages: alarms raised vs received, RSS
#   make bench-rtsp      8 RTSP streams (640x480 H.264, 15 fps) decoded and scored
#   make bench-train     training speed, ganomaly-train vs PyTorch side by side
#   make bench-quality   detection quality: AUROC per data set x score x seed
#   make bench-mnist     the paper's MNIST protocol (hours at full size)
#   make fuzz    fuzz the MJPEG part reader and JPEG decoding (FUZZ_SECONDS each, nightly)
#   make deb     Debian package in target/debian (deb-gpu: with onnxruntime-gpu; test-deb: install, run, purge)
#
# Everything the tests need is installed here, idempotently: a Python venv
# (.venv) with ONNX Runtime, onnx and torch (CPU), Debian's libclang (the
# V4L2 camera bindings are generated with bindgen at build time) and Debian's
# mosquitto (a broker the MQTT tests start and stop themselves).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON    ?= python3
VENV      := $(CURDIR)/.venv
VPY       := $(VENV)/bin/python
PYVER     := $(shell $(PYTHON) -c 'import sys; print(f"python{sys.version_info[0]}.{sys.version_info[1]}")')
SITE      := $(VENV)/lib/$(PYVER)/site-packages
ORT_LIB   := $(SITE)/onnxruntime/capi/libonnxruntime.so.1.31.1
TORCH_VER := 2.13.0
SUDO      := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# libtorch from the torch wheel (tch 0.26 expects PyTorch 2.13.0).
export LIBTORCH            := $(SITE)/torch
export ORT_DYLIB_PATH      := $(ORT_LIB)
export GANOMALY_PYTHON     := $(VPY)
# Tests that need the venv fail instead of skipping when run from make.
export GANOMALY_REQUIRE_PYTHON := 1
# Likewise the TLS and broker-restart tests, which start their own Mosquitto.
export GANOMALY_REQUIRE_MOSQUITTO := 1
# And the GigE camera test, which needs root for its network namespace.
export GANOMALY_REQUIRE_GSTREAMER := 1
# And the console's browser test, which needs Debian's chromium.
export GANOMALY_REQUIRE_CHROMIUM := 1
# And the commissioning test, which runs the trainer binary (built by `cargo test --workspace`).
export GANOMALY_REQUIRE_TRAINER := 1

STAMP_ORT   := $(VENV)/.stamp-ort
STAMP_TORCH := $(VENV)/.stamp-torch-$(TORCH_VER)
STAMP_TORCH_PY := $(VENV)/.stamp-torch-full-$(TORCH_VER)
STAMP_APT   := $(CURDIR)/target/.stamp-apt
GST_DEBS    := pkg-config libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev libgstrtspserver-1.0-dev \
               gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad \
               gstreamer1.0-plugins-ugly gstreamer1.0-libav gstreamer1.0-rtsp aravis-tools aravis-tools-cli

.PHONY: soak lint trainer-release help venv deps test test-core test-daemon test-trainer demo bench bench-rtsp bench-train bench-quality bench-mnist bench-tiles build release install clean-venv

help:
	@sed -n '2,13p' Makefile

$(STAMP_ORT): scripts/requirements.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -r scripts/requirements.txt
	test -f $(ORT_LIB) || { echo "ONNX Runtime library missing at $(ORT_LIB)"; exit 1; }
	touch $@

# torch's CUDA wheel without its CUDA dependencies (1.25 GB instead of 4.8): the
# trainer links only libtorch_cpu and libc10, whose references to the CUDA
# runtime and CUPTI the two small nvidia wheels satisfy. Python's `import torch`
# needs the full set: $(STAMP_TORCH_PY) below, for the side-by-side benchmarks.
# On a GPU box, `pip install torch==$(TORCH_VER)` gives the trainer CUDA too.
$(STAMP_TORCH): $(STAMP_ORT) scripts/requirements-torch.txt
	$(VPY) -m pip install -q --disable-pip-version-check --no-deps torch==$(TORCH_VER) nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
	$(VPY) -m pip install -q --disable-pip-version-check -r scripts/requirements-torch.txt
	touch $@

$(STAMP_TORCH_PY): $(STAMP_TORCH)
	$(VPY) -m pip install -q --disable-pip-version-check torch==$(TORCH_VER)
	touch $@

$(STAMP_APT): Makefile
	@mkdir -p $(dir $@)
	if ! ldconfig -p | grep -q 'libclang-1[0-9]*\.so\|libclang\.so'; then \
	  $(SUDO) apt-get install -y --no-install-recommends libclang1-14 || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends libclang1-14; }; \
	fi
	# The TLS and broker-restart tests start their own Mosquitto (and mosquitto_passwd).
	if ! command -v mosquitto >/dev/null && ! test -x /usr/sbin/mosquitto; then \
	  $(SUDO) apt-get install -y --no-install-recommends mosquitto || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends mosquitto; }; \
	fi
	# `make soak`'s independent subscriber (mosquitto_sub).
	if ! command -v mosquitto_sub >/dev/null; then \
	  $(SUDO) apt-get install -y --no-install-recommends mosquitto-clients || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends mosquitto-clients; }; \
	fi
	# The console's browser test (tests/console_browser.rs): headless Chromium.
	if ! command -v chromium >/dev/null; then \
	  $(SUDO) apt-get install -y --no-install-recommends chromium || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends chromium; }; \
	fi
	# GStreamer (the rtsp, genicam and gstreamer sources; feature `gstreamer`):
	# headers to build, plugins the tests use (x264enc is in -ugly, x265enc in
	# -bad), gst-rtsp-server for the test camera, Aravis's element, its fake
	# GigE camera (aravis-tools) and discovery tool (aravis-tools-cli).
	if ! dpkg -s $(GST_DEBS) >/dev/null 2>&1; then \
	  $(SUDO) apt-get install -y --no-install-recommends $(GST_DEBS) || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends $(GST_DEBS); }; \
	fi
	touch $@

venv: $(STAMP_ORT) $(STAMP_TORCH)

deps: venv $(STAMP_APT)

build: $(STAMP_APT)
	cargo build

release: $(STAMP_APT)
	cargo build --release

test: deps
	cargo test --workspace --no-fail-fast

# The trainer is linted too: clippy and doc build it, so libtorch must be there.
lint: deps
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps

test-core:
	cargo test -p ganomaly-core

test-daemon: $(STAMP_ORT) $(STAMP_APT)
	cargo test -p ganomalyd

test-trainer: $(STAMP_TORCH)
	cargo test -p ganomaly-train

demo: $(STAMP_ORT) $(STAMP_APT)
	cargo run --release --bin ganomalyd -- run --config config/demo.toml

# One table: raw ORT, the pipeline at 1 and 4 cameras, the Python peer
# (benches/peer.py) on the same model and frames, both RSS, latency at low
# (4 x 15 fps) and full load; demo model and a 128 px ngf 32 one (benches/table.py).
bench: $(STAMP_ORT) $(STAMP_APT)
	cargo build --release --bin ganomalyd
	$(VPY) benches/table.py --bin target/release/ganomalyd

# Minutes: a release build, then the daemon until a million frames are decided
# (SOAK_FRAMES=100000 for a quick try). Fails if an alarm event is not received.
soak: $(STAMP_ORT) $(STAMP_APT)
	cargo bench -p ganomalyd --bench soak

# 8 RTSP streams, 640x480 H.264 at 15 fps, decoded on the CPU and scored.
bench-rtsp: $(STAMP_ORT) $(STAMP_APT)
	cargo bench --bench rtsp_streams -- --streams 8 --seconds 20

trainer-release: $(STAMP_TORCH)
	cargo build --release -p ganomaly-train

bench-train: $(STAMP_TORCH_PY) trainer-release
	$(VPY) benches/train_speed.py --bin target/release/ganomaly-train

bench-quality: deps trainer-release
	benches/quality.sh

bench-mnist: deps trainer-release
	benches/mnist_protocol.sh

# The tiling table (issue 17): whole frame vs tiles, AUROC and fps (benches/README.md, "Tiles").
bench-tiles: deps trainer-release
	cargo build --release --bin ganomalyd
	benches/tiles.sh -f

clean-venv:
	rm -rf $(VENV)

# ---------------------------------------------------------------------------
# Debian package (README, "Install on a box"). Not part of `make test`: these
# install cargo-deb (compiled from crates.io, pinned) and lintian only here.
# `deb` fails on any lintian error or warning not explained in
# packaging/lintian-overrides.
.PHONY: deb deb-gpu test-deb

CARGO_DEB_VER := 3.8.0
DEB_VERSION   := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)-1
DEB_ARCH      := $(shell dpkg --print-architecture 2>/dev/null || echo amd64)
DEB           := target/debian/ganomalyd_$(DEB_VERSION)_$(DEB_ARCH).deb
DEB_GPU       := target/debian/ganomalyd-gpu_$(DEB_VERSION)_$(DEB_ARCH).deb
STAMP_DEB     := $(CURDIR)/target/.stamp-deb-tools-$(CARGO_DEB_VER)
# onnxruntime-gpu beside, not in, .venv: the tests keep the CPU build.
VENV_GPU      := $(CURDIR)/target/venv-gpu
STAMP_ORT_GPU := $(VENV_GPU)/.stamp-ort-gpu
ORT_GPU_VER   := $(shell sed -n 's/^onnxruntime==//p' scripts/requirements.txt)
# `make deb DEB_MAINTAINER="Name <mail>"` to sign the package with a real address.
DEB_MAINTAINER ?=

$(STAMP_DEB):
	@mkdir -p $(dir $@)
	if ! cargo deb --version 2>/dev/null | grep -qx 'cargo-deb $(CARGO_DEB_VER)'; then \
	  cargo install cargo-deb --locked --version $(CARGO_DEB_VER); \
	fi
	if ! command -v lintian >/dev/null; then \
	  $(SUDO) apt-get install -y --no-install-recommends lintian || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends lintian; }; \
	fi
	touch $@

$(STAMP_ORT_GPU): scripts/requirements.txt
	test -x $(VENV_GPU)/bin/python || $(PYTHON) -m venv $(VENV_GPU)
	$(VENV_GPU)/bin/pip install -q --disable-pip-version-check --no-deps onnxruntime-gpu==$(ORT_GPU_VER)
	touch $@

# What both packages need: ONNX Runtime staged from a wheel's site-packages
# ($(1)) into target/packaging/ort (Cargo.toml names no Python version), its
# licence checked against the copyright file's last `License: MIT` paragraph,
# the man page compressed as dpkg wants it, and the release binary (cargo
# deb --no-build).
define deb_inputs
	rm -rf target/packaging/ort && mkdir -p target/packaging/ort
	cp $(1)/onnxruntime/capi/libonnxruntime*.so* $(1)/onnxruntime/LICENSE $(1)/onnxruntime/ThirdPartyNotices.txt target/packaging/ort/
	awk '/^License: MIT$$/ { text = ""; on = 1; next } on { text = text $$0 "\n" } END { printf "%s", text }' packaging/copyright \
	  | sed 's/^ //; s/^\.$$//' | diff -u - target/packaging/ort/LICENSE \
	  || { echo "packaging/copyright: the MIT text differs from $(1)/onnxruntime/LICENSE"; exit 1; }
	gzip -9n < packaging/ganomalyd.1 > target/packaging/ganomalyd.1.gz
	cargo build --release -p ganomalyd
endef

deb: $(STAMP_ORT) $(STAMP_APT) $(STAMP_DEB)
	$(call deb_inputs,$(SITE))
	cargo deb -p ganomalyd --no-build $(if $(DEB_MAINTAINER),--maintainer "$(DEB_MAINTAINER)") -o $(DEB)
	lintian --fail-on error,warning $(DEB)

deb-gpu: $(STAMP_ORT) $(STAMP_APT) $(STAMP_DEB) $(STAMP_ORT_GPU)
	$(call deb_inputs,$(VENV_GPU)/lib/$(PYVER)/site-packages)
	cargo deb -p ganomalyd --no-build --variant gpu $(if $(DEB_MAINTAINER),--maintainer "$(DEB_MAINTAINER)") -o $(DEB_GPU)
	lintian --fail-on error,warning $(DEB_GPU)

# Installs the package on THIS machine (dpkg -i, as root), runs it as its
# user, checks the unit, purges it: scripts/test-deb.sh. systemd-analyze
# checks the unit (systemd need not be running).
test-deb: deb
	if ! command -v systemd-analyze >/dev/null; then \
	  $(SUDO) apt-get install -y --no-install-recommends systemd || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends systemd; }; \
	fi
	env -u ORT_DYLIB_PATH scripts/test-deb.sh $(DEB)

# ---------------------------------------------------------------------------
# Fuzzing what a camera sends (not part of `make test`, nor of CI): each
# target of fuzz/ runs FUZZ_SECONDS (60 by default) under libFuzzer with
# nightly Rust. cargo-fuzz is installed from crates.io (pinned) on first use,
# built with stable: its pinned dependencies no longer build on nightly.
# The corpus grows in fuzz/corpus/<target> (seeded from fuzz/seeds, kept out
# of git); a crash stops the run and leaves its input in fuzz/artifacts/.
.PHONY: fuzz

CARGO_FUZZ_VER := 0.13.1
FUZZ_SECONDS   ?= 60
FUZZ_TARGETS   := mjpeg_parts decode_jpeg

fuzz:
	if ! cargo fuzz --version 2>/dev/null | grep -q '$(CARGO_FUZZ_VER)'; then \
	  cargo install cargo-fuzz --locked --version $(CARGO_FUZZ_VER); \
	fi
	for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/corpus/$$t && cp -n fuzz/seeds/$$t/* fuzz/corpus/$$t/; \
	  (cd fuzz && cargo +nightly fuzz run $$t corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=1024 -timeout=10); \
	done
