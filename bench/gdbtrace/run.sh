#!/bin/bash
# Where a spawn's guest instructions go: boots ELF (a release spawnbench) under -icount as
# `cargo xtask bench` does (q35, TCG, 2 GiB, level `smoke`), stops at START (a hex address,
# e.g. the `rdtsc` before a measured spawn: `objdump -d` + `addr2line -i`), skips SKIP earlier
# hits, single-steps STEPS instructions in QEMU's gdbstub and writes their RIPs to OUT.
# Then: python3 profile.py ELF OUT FROM TO [DEPTH] [MIN] prints the inlined-call tree.
# Usage: run.sh ELF START OUT [SKIP=10] [STEPS=6000]     (port: TPORT, default 1239)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
elf=$1
export TSTART=$2 TOUT=$3 TSKIP=${4:-10} TSTEPS=${5:-6000} TPORT=${TPORT:-1239}
bios=()
[ -e /usr/share/qemu/qboot.rom ] && bios=(-bios /usr/share/qemu/qboot.rom)
timeout 900 qemu-system-x86_64 -M q35 "${bios[@]}" -accel tcg -cpu max \
    -icount shift=0,sleep=off -m 2G -smp 1 -kernel "$elf" -append 'log=warn -- smoke' \
    -nodefaults -display none -serial null -monitor none -no-reboot \
    -device isa-debug-exit,iobase=0xf4,iosize=0x04 -gdb "tcp:127.0.0.1:$TPORT" -S &
qemu=$!
trap 'kill $qemu 2>/dev/null || true' EXIT
sleep 1
timeout 900 gdb -q -batch -x "$here/trace.py" "$elf" > "$TOUT.gdb.log" 2>&1 || true
wait $qemu 2>/dev/null || true
wc -l < "$TOUT"
