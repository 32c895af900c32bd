# shellcheck shell=bash disable=SC2034
# (SC2034: the variables set here are used by the scripts that source it.)
# Shared helpers for cross/build, cross/test, cross/test-deb and cross/ci.
# Sourced, never run. Every helper says what it is doing on stderr.

# Pinned tool versions (PyPI). Tested together with Rust 1.95.
ZIGLANG_VERSION=0.15.2
CARGO_ZIGBUILD_VERSION=0.24.1

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIST="$ROOT/target/dist"

say() { printf '== %s\n' "$*" >&2; }
note() { printf '   %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# The crate version, from Cargo.toml's [package] section.
crate_version() {
    sed -n '/^\[package\]/,/^\[/{s/^version *= *"\([^"]*\)".*/\1/p}' "$ROOT/Cargo.toml" | head -n1
}

_apt_updated=0
# apt_install PKG...: install the Debian packages that are not installed yet.
apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "need Debian packages ${missing[*]} but apt-get is not available"
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if [ "$_apt_updated" -eq 0 ]; then
        apt-get update -qq
        _apt_updated=1
    fi
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ensure_rust_target TRIPLE: the Rust standard library for TRIPLE.
ensure_rust_target() {
    if ! rustup target list --installed | grep -qx "$1"; then
        say "installing the Rust standard library for $1 (rustup target add)"
        rustup target add "$1" >&2
    fi
}

# ensure_zig: zig (PyPI ziglang) and cargo-zigbuild, pinned.
ensure_zig() {
    local scripts
    scripts="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
    case ":$PATH:" in *":$scripts:"*) ;; *) PATH="$PATH:$scripts" ;; esac
    export PATH
    if command -v cargo-zigbuild >/dev/null 2>&1 &&
        cargo-zigbuild --version 2>/dev/null | grep -q " ${CARGO_ZIGBUILD_VERSION}\$" &&
        [ "$(python3 -m ziglang version 2>/dev/null)" = "$ZIGLANG_VERSION" ]; then
        return 0
    fi
    say "installing zig ${ZIGLANG_VERSION} and cargo-zigbuild ${CARGO_ZIGBUILD_VERSION} (pip)"
    local pkgs=("ziglang==${ZIGLANG_VERSION}" "cargo-zigbuild==${CARGO_ZIGBUILD_VERSION}")
    if ! python3 -m pip install --quiet --disable-pip-version-check "${pkgs[@]}" 2>/tmp/frond-pip.err; then
        if grep -q externally-managed /tmp/frond-pip.err; then
            note "system Python is externally managed; installing with --break-system-packages"
            python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "${pkgs[@]}"
        else
            cat /tmp/frond-pip.err >&2
            die "pip could not install ${pkgs[*]}"
        fi
    fi
    hash -r
    command -v cargo-zigbuild >/dev/null || die "cargo-zigbuild installed but not on PATH ($scripts)"
}

# load_target TRIPLE: source targets/TRIPLE.env (sets TARGET, STRATEGY, ...).
load_target() {
    local f="$ROOT/targets/$1.env"
    [ -f "$f" ] || die "unknown target '$1': no $f (known: $(known_targets))"
    TARGET='' STRATEGY='' LINKER='' GLIBC_FLOOR='' LINKAGE='' RUSTFLAGS_EXTRA=''
    DEB_ARCH='' QEMU='' QEMU_LD_PREFIX='' QEMU_SYSROOT_PKG=''
    # shellcheck source=/dev/null
    . "$f"
    [ "$TARGET" = "$1" ] || die "$f sets TARGET=$TARGET, expected $1"
    case "$STRATEGY" in zigbuild | cargo) ;; *) die "$f: STRATEGY must be zigbuild or cargo" ;; esac
}

# load_board NAME: source boards/NAME/board.env (sets BOARD_DESC, TARGET, ...).
load_board() {
    local f="$ROOT/boards/$1/board.env"
    [ -f "$f" ] || die "unknown board '$1': no $f (known: $(known_boards))"
    BOARD_DESC='' TARGET='' DATA_DIR='' MEMORY_HIGH='' MEMORY_MAX='' LIMIT_NOFILE=''
    # shellcheck source=/dev/null
    . "$f"
    [ -n "$TARGET" ] || die "$f does not name a TARGET"
    [ -n "$DATA_DIR" ] || die "$f does not set DATA_DIR"
    [ -f "$ROOT/boards/$1/frond.toml" ] || die "board $1 has no frond.toml"
}

known_targets() {
    local f
    for f in "$ROOT"/targets/*.env; do printf '%s ' "$(basename "$f" .env)"; done
}
known_boards() { (cd "$ROOT/boards" && for d in */; do [ -f "$d/board.env" ] && printf '%s ' "${d%/}"; done); }

# resolve NAME: a target triple or a board name. Sets BOARD (generic for a
# bare triple) and loads the board's and then the target's variables.
resolve() {
    local name="$1" target
    if [ -f "$ROOT/targets/$name.env" ]; then
        BOARD=generic
        load_board generic
        target="$name"
    elif [ -f "$ROOT/boards/$name/board.env" ]; then
        BOARD="$name"
        load_board "$name"
        target="$TARGET"
    else
        die "'$name' is neither a target (targets/*.env: $(known_targets)) nor a board (boards/*/board.env: $(known_boards))"
    fi
    load_target "$target"
}

# The release binary of the loaded target.
bin_path() { printf '%s/target/%s/release/frond' "$ROOT" "$TARGET"; }

# The environment variable cargo reads for TARGET's runner/linker prefix.
cargo_target_env() { printf 'CARGO_TARGET_%s' "$(printf '%s' "$TARGET" | tr 'a-z.-' 'A-Z__')"; }

# ensure_toolchain: everything needed to build the loaded target.
ensure_toolchain() {
    ensure_rust_target "$TARGET"
    if [ "$STRATEGY" = zigbuild ]; then
        ensure_zig
    else
        command -v "$LINKER" >/dev/null || apt_install gcc
    fi
    # binutils gives readelf, used to check what was built.
    command -v readelf >/dev/null || apt_install binutils
}

# cargo_for_target SUBCOMMAND ARGS...: cargo (or cargo zigbuild) for TARGET.
cargo_for_target() {
    local sub="$1"
    shift
    local triple="$TARGET"
    [ -n "$GLIBC_FLOOR" ] && triple="$TARGET.$GLIBC_FLOOR"
    local rf="${RUSTFLAGS:-}"
    [ -n "$RUSTFLAGS_EXTRA" ] && rf="$rf $RUSTFLAGS_EXTRA"
    if [ "$STRATEGY" = zigbuild ]; then
        # cargo-zigbuild: `cargo zigbuild` builds, `cargo-zigbuild test` tests.
        note "cargo-zigbuild $sub --target $triple $* (linker: zig $ZIGLANG_VERSION)"
        [ "$sub" = build ] && sub=zigbuild
        (cd "$ROOT" && RUSTFLAGS="$rf" cargo-zigbuild "$sub" --locked --target "$triple" "$@")
    else
        note "cargo $sub --target $triple $* (linker: $LINKER)"
        (cd "$ROOT" && RUSTFLAGS="$rf" cargo "$sub" --locked --target "$triple" "$@")
    fi
}

# build_binary: the stripped release binary for TARGET; checks what it made.
build_binary() {
    ensure_toolchain
    say "building frond $(crate_version) for $TARGET (release, $LINKAGE)"
    cargo_for_target build --release --bin frond
    check_binary "$(bin_path)"
}

# check_binary FILE: right architecture, stripped, linkage and glibc floor.
check_binary() {
    local bin="$1" machine want
    [ -x "$bin" ] || die "build produced no $bin"
    machine="$(readelf -h "$bin" | sed -n 's/^ *Machine: *//p')"
    case "$TARGET" in
        aarch64-*) want='AArch64' ;;
        armv7-*) want='ARM' ;;
        x86_64-*) want='Advanced Micro Devices X86-64' ;;
        *) want="$machine" ;;
    esac
    [ "$machine" = "$want" ] || die "$bin is for '$machine', expected '$want'"
    if readelf -S "$bin" | grep -q '\.symtab'; then
        die "$bin is not stripped (the release profile sets strip = true)"
    fi
    if [ "$LINKAGE" = static ]; then
        if readelf -l "$bin" | grep -q 'program interpreter' || readelf -d "$bin" | grep -q NEEDED; then
            die "$bin should be fully static but is dynamically linked"
        fi
    fi
    if [ -n "$GLIBC_FLOOR" ]; then
        local newest
        newest="$(readelf -V "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1)"
        if [ -n "$newest" ] && [ "$(printf '%s\n%s\n' "$newest" "$GLIBC_FLOOR" | sort -V | tail -n1)" != "$GLIBC_FLOOR" ]; then
            die "$bin needs glibc $newest, newer than the floor $GLIBC_FLOOR"
        fi
        note "newest glibc symbol version needed: ${newest:-none} (floor $GLIBC_FLOOR)"
    fi
    note "$bin: $(stat -c %s "$bin") bytes, $machine, stripped, $LINKAGE"
}

# ensure_runner: what it takes to run TARGET's binaries on this host.
# Exports the qemu runner for cargo and QEMU_LD_PREFIX for dynamic targets.
RUN=()
ensure_runner() {
    RUN=()
    [ -z "$QEMU" ] && return 0
    local pkgs=(qemu-user-static)
    [ -n "$QEMU_SYSROOT_PKG" ] && pkgs+=("$QEMU_SYSROOT_PKG")
    command -v "$QEMU" >/dev/null && pkgs=("${pkgs[@]:1}")
    [ "${#pkgs[@]}" -gt 0 ] && apt_install "${pkgs[@]}"
    command -v "$QEMU" >/dev/null || die "$QEMU not found after installing qemu-user-static"
    if [ -n "$QEMU_LD_PREFIX" ]; then
        [ -d "$QEMU_LD_PREFIX" ] || die "$QEMU_LD_PREFIX missing (Debian package $QEMU_SYSROOT_PKG)"
        export QEMU_LD_PREFIX
    fi
    RUN=("$QEMU")
    export "$(cargo_target_env)_RUNNER=$QEMU"
}
