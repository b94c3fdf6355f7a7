# Convenience recipes. Install just with `cargo install just` (or your package manager).
# Every recipe is a plain cargo command underneath; see README.md.

# Build the binaries (release: the only profile this project builds and tests in).
build:
    cargo build --release

# Run the whole test suite (wgpu tests need a Vulkan driver: `apt-get install mesa-vulkan-drivers`).
test:
    cargo test --release

# Train the embedded quickstart (ResNet-20 + CutMix on 2,000 shipped CIFAR-10 images).
quickstart *ARGS:
    cargo run --release --bin train -- --config configs/quickstart.toml {{ARGS}}

# Train any recipe: just train configs/cifar100_cutmix.toml --set train.epochs=1
train CONFIG *ARGS:
    cargo run --release --bin train -- --config {{CONFIG}} {{ARGS}}

# Download and verify CIFAR-10 or CIFAR-100 into data/ (needs curl or wget).
fetch-cifar WHICH:
    scripts/fetch_cifar.sh {{WHICH}} data

# Format and lint.
fmt:
    cargo fmt --all

lint:
    cargo fmt --all -- --check
    cargo clippy --release --all-targets -- -D warnings
