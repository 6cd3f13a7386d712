# Sourced by the scripts: one cache outside the clone for the cargo target dir and the model.
export EDGEACT_CACHE="${EDGEACT_CACHE:-${HOME:-/root}/.cache/edgeact}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$EDGEACT_CACHE/target}"
