#!/bin/sh
# Install stackd for the current user from this checkout, and start its user service.
#
#   ./install.sh               venv + pip install + ~/.local/bin/stackd + `stackd setup`
#   ./install.sh --uninstall   `stackd setup --uninstall`, then remove the venv and the link
#   ./install.sh --uninstall --purge   ... and the config and update history as well
#
# Safe to run again: an unchanged checkout is not reinstalled, and `stackd setup` only acts
# when something differs. A changed checkout is reinstalled and a running daemon restarted.
#
# Environment:
#   PYTHON=python3.12     the interpreter for the venv (default: python3; needs >= 3.11)
#   STACKD_PIP_ARGS="..." extra `pip install` arguments (e.g. --no-index --find-links DIR)
#   XDG_DATA_HOME         the venv goes to $XDG_DATA_HOME/stackd/venv (~/.local/share/...)
set -eu

usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
}

uninstall=0
purge=0
for arg in "$@"; do
    case $arg in
    --uninstall) uninstall=1 ;;
    --purge) purge=1 ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        echo "install.sh: unknown argument: $arg (see --help)" >&2
        exit 2
        ;;
    esac
done
if [ "$purge" = 1 ] && [ "$uninstall" = 0 ]; then
    echo "install.sh: --purge goes with --uninstall" >&2
    exit 2
fi

say() { printf '%s\n' "install.sh: $*"; }
die() {
    code=$1
    shift
    printf '%s\n' "install.sh: error: $*" >&2
    exit "$code"
}

[ -n "${HOME:-}" ] || die 2 "HOME is not set"
case ${XDG_DATA_HOME:-} in
/*) data_home=$XDG_DATA_HOME ;;
*) data_home=$HOME/.local/share ;; # unset or relative: the XDG default
esac
prefix=$data_home/stackd
venv=$prefix/venv
bin_dir=$HOME/.local/bin
link=$bin_dir/stackd
stamp=$venv/.stackd-source-sha256
src=$(cd "$(dirname "$0")" && pwd -P)

# The link is ours when it points into our venv; anything else at that path is left alone.
link_is_ours() {
    [ -L "$link" ] && [ "$(readlink "$link")" = "$venv/bin/stackd" ]
}

if [ "$uninstall" = 1 ]; then
    if [ -x "$venv/bin/stackd" ]; then
        set -- setup --uninstall
        [ "$purge" = 1 ] && set -- "$@" --purge
        rc=0
        "$venv/bin/stackd" "$@" || rc=$?
        if [ "$rc" -ne 0 ]; then
            die "$rc" "\`stackd $*\` failed (exit $rc); nothing else was removed. Fix the cause and run ./install.sh --uninstall again"
        fi
    else
        say "no stackd in $venv: skipping \`stackd setup --uninstall\`"
    fi
    if link_is_ours; then
        rm -f "$link"
        say "removed $link"
    elif [ -e "$link" ] || [ -L "$link" ]; then
        say "left $link in place: it does not point into $venv"
    fi
    if [ -d "$venv" ]; then
        rm -rf "$venv"
        say "removed $venv"
    fi
    rmdir "$prefix" 2>/dev/null || true
    say "stackd is uninstalled"
    exit 0
fi

# -- checks, before anything is written ------------------------------------------------------
python=${PYTHON:-python3}
command -v "$python" >/dev/null 2>&1 ||
    die 2 "$python not found: install Python 3.11 or newer (Debian/Ubuntu: apt install python3), or set PYTHON=/path/to/python3.11"
version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])') ||
    die 2 "$python does not run"
major=${version%%.*}
minor=${version#*.}
if [ "$major" -lt 3 ] || { [ "$major" -eq 3 ] && [ "$minor" -lt 11 ]; }; then
    die 2 "$python is Python $version; stackd needs Python >= 3.11. Install a newer python3, or set PYTHON=/path/to/python3.11"
fi
"$python" -c 'import venv, ensurepip' >/dev/null 2>&1 ||
    die 2 "$python cannot create virtual environments (the venv/ensurepip modules are missing). On Debian/Ubuntu: apt install python3-venv"
[ -f "$src/pyproject.toml" ] && [ -d "$src/stackd" ] ||
    die 2 "$src does not look like a stackd checkout (no pyproject.toml or stackd/)"
if [ -e "$link" ] && ! link_is_ours; then
    die 2 "$link exists and is not a link into $venv (another stackd install?): remove it, or uninstall the other one first"
fi

# -- the venv -------------------------------------------------------------------------------
# A venv whose base interpreter went away (a distribution upgrade) is rebuilt.
if [ -d "$venv" ] && ! "$venv/bin/python" -c '' >/dev/null 2>&1; then
    say "$venv is broken (its python no longer runs): rebuilding it"
    rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
    mkdir -p "$prefix"
    "$python" -m venv "$venv"
    say "created $venv (Python $version)"
fi

# What pip installs: the package sources, copied out of the checkout so that the build does
# not litter it (build/, *.egg-info) and concurrent installs do not share a build directory.
source_digest() {
    (cd "$src" && find pyproject.toml README.md stackd -type f ! -name '*.pyc' | LC_ALL=C sort |
        xargs sha256sum) | sha256sum | cut -d' ' -f1
}
digest=$(source_digest)
upgraded=0
if [ -x "$venv/bin/stackd" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then
    say "stackd in $venv is current"
else
    was_installed=0
    [ -x "$venv/bin/stackd" ] && was_installed=1
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    cp -R "$src/pyproject.toml" "$src/README.md" "$src/stackd" "$work/"
    find "$work" -name __pycache__ -type d -prune -exec rm -rf {} +
    say "installing stackd into $venv (pip install; this takes a little while)"
    # shellcheck disable=SC2086 # STACKD_PIP_ARGS is a list of words on purpose
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        ${STACKD_PIP_ARGS:-} "$work"
    printf '%s\n' "$digest" >"$stamp"
    rm -rf "$work"
    trap - EXIT
    upgraded=$was_installed
    say "installed $("$venv/bin/stackd" --version)"
fi

mkdir -p "$bin_dir"
if ! link_is_ours; then
    ln -s "$venv/bin/stackd" "$link"
    say "linked $link -> $venv/bin/stackd"
fi
case ":${PATH:-}:" in
*":$bin_dir:"*) ;;
*) say "note: $bin_dir is not on your PATH; add it (e.g. in ~/.profile) to type \`stackd\`" ;;
esac

# -- the user service -------------------------------------------------------------------------
was_active=$(systemctl --user is-active stackd.service 2>/dev/null || true)
"$link" setup
if [ "$upgraded" = 1 ] && [ "$was_active" = active ]; then
    systemctl --user try-restart stackd.service
    say "restarted stackd.service to run the new version"
fi
