# Convenience recipes. Install just with `cargo install just` (or your package manager).
# Every recipe is a plain cargo command underneath; see README.md.

# Build the binaries (release: the only profile this project builds and tests in).
build:
    cargo build --release

# Run the whole test suite (wgpu tests need a Vulkan driver: `apt-get install mesa-vulkan-drivers`).
# Filter by test name rather than with `-p CRATE`: building one package alone unifies Burn's
# features differently and recompiles all of Burn (25+ minutes).
test:
    cargo test --release

# On an AVX-512 CPU, the CPU kernels' tests once more on their AVX2 + FMA path, under valgrind
# (`apt-get install valgrind`), after `just test`.
test-avx2-path:
    scripts/test_avx2_path.sh

# The data-parallel (MPI) build's tests: two ranks under mpirun. Needs Open MPI and libclang
# (`apt-get install libopenmpi-dev openmpi-bin libclang-dev`). The feature changes what some of
# Burn's dependencies are built with, so its first build compiles Burn again (about 25 minutes).
test-mpi:
    cargo test --release --features cutmix-train/mpi --test distributed

# The gradient all-reduce next to a CPU training step, on 2 ranks (as test-mpi needs).
bench-allreduce RANKS="2":
    cargo build --release --features cutmix-train/mpi --bin bench_allreduce --bin train
    mpirun --oversubscribe --bind-to none -np {{RANKS}} target/release/bench_allreduce

# Train the embedded quickstart (ResNet-20 + CutMix on 2,000 shipped CIFAR-10 images).
quickstart *ARGS:
    cargo run --release --bin train -- --config configs/quickstart.toml {{ARGS}}

# Train any recipe: just train configs/cifar100_cutmix.toml --set train.epochs=1
train CONFIG *ARGS:
    cargo run --release --bin train -- --config {{CONFIG}} {{ARGS}}

# Download and verify CIFAR-10 or CIFAR-100 into data/ (needs curl or wget).
fetch-cifar WHICH:
    scripts/fetch_cifar.sh {{WHICH}} data

# Training steps on the CPU next to PyTorch (needs .venv: `just interop` makes it).
bench-cpu *ARGS:
    scripts/bench_cpu.sh {{ARGS}}

# Training steps on a GPU (wgpu) next to PyTorch on CUDA: needs an NVIDIA GPU with its Vulkan
# driver and python3 with torch (`DRY=1 just bench-gpu` checks the script anywhere, tiny shapes).
# `just bench-gpu --bundle` makes a tarball that runs on a GPU machine with no Rust toolchain.
bench-gpu *ARGS:
    scripts/bench_gpu.sh {{ARGS}}

# Loader vs torchvision on one core, and peak memory (needs .venv: `just interop` makes it).
bench-loader *ARGS:
    scripts/bench_loader.sh {{ARGS}}

# What each mixing method costs per batch against a training step (flex).
bench-mixing *ARGS:
    cargo run --release --bin bench_mixing -- {{ARGS}}

# List the model zoo with parameter counts and multiply-accumulates.
models:
    cargo run --release --bin train -- --list-models

# Check weights against PyTorch both ways (export, import, fine-tune, parameter counts, MACs).
# Makes .venv with torch, torchvision and safetensors from PyPI on first use (python3 -m venv).
interop:
    test -x .venv/bin/python || python3 -m venv .venv
    .venv/bin/python -c "import torch, torchvision, safetensors" 2>/dev/null || .venv/bin/pip install torch torchvision safetensors numpy
    cargo build --release
    .venv/bin/python scripts/check_torch_interop.py

# Rewrite the committed PyTorch / scikit-learn fixtures the tests compare against (CAMs, FGSM and
# ODIN batches, OOD metrics with ties, calibration); needs .venv with torch and scikit-learn.
fixtures:
    test -x .venv/bin/python || python3 -m venv .venv
    .venv/bin/python -c "import torch, safetensors, sklearn, scipy" 2>/dev/null || .venv/bin/pip install torch torchvision safetensors numpy scikit-learn scipy
    .venv/bin/python scripts/check_torch_interop.py --write-cam-fixture
    .venv/bin/python scripts/check_torch_interop.py --write-fgsm-fixture
    .venv/bin/python scripts/write_analysis_fixture.py

# One analysis (fgsm, occlusion, between, ood, calibration) over several weights files as the
# paper's table and one figure: just analysis-table fgsm --config C --weights A --label Baseline ...
analysis-table *ARGS:
    cargo build --release --bin analyze
    python3 scripts/analysis_table.py {{ARGS}}

# Format and lint.
fmt:
    cargo fmt --all

lint:
    cargo fmt --all -- --check
    cargo clippy --release --all-targets -- -D warnings
