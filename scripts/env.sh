# Sourced by the scripts: one cache outside the clone for the cargo target dir and the model.
export EDGEACT_CACHE="${EDGEACT_CACHE:-${HOME:-/root}/.cache/edgeact}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$EDGEACT_CACHE/target}"
# llama.cpp's OpenMP threads spin at every barrier by default; on a busy machine a spinning
# thread waits a whole time slice for a descheduled peer (7-10x slower measured at load 13).
# The edgeact binary sets this itself (src/cli/threads.rs); here it also covers the test
# processes that load the model in-process and the llama.cpp peer of scripts/bench-peer.
[ -n "${OMP_WAIT_POLICY:-}" ] || export GOMP_SPINCOUNT="${GOMP_SPINCOUNT:-1000}"
