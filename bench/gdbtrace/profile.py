"""The inlined-call tree of a RIP trace from run.sh.

Usage: profile.py ELF TRACE FROM TO [DEPTH=40] [MIN=20]

Symbolizes every RIP with its inlined frames (addr2line -i, the release profile's line tables),
rebuilds the call stack from the call/ret instructions it executed (objdump), and prints, for
instructions FROM..TO of the trace, how many fell under each frame (DFS order, frames under MIN
left out). `rdtsc` lines list where the clock was read: a benchmark's start and end marks.
"""
import bisect
import collections
import re
import subprocess
import sys

elf, trace = sys.argv[1], sys.argv[2]
lo, hi = int(sys.argv[3]), int(sys.argv[4])
depth = int(sys.argv[5]) if len(sys.argv) > 5 else 40
least = int(sys.argv[6]) if len(sys.argv) > 6 else 20
seq = [l.strip() for l in open(trace) if l.strip()]
uniq = sorted(set(seq))
out = subprocess.run(["addr2line", "-e", elf, "-i", "-f", "-C", "-a"] + ["0x" + u for u in uniq],
                     capture_output=True, text=True, check=True).stdout.splitlines()
frames = {}
cur = None
i = 0
while i < len(out):
    if out[i].startswith("0x"):
        cur = "%x" % int(out[i], 16)
        frames[cur] = []
        i += 1
        continue
    frames[cur].insert(0, out[i])  # outermost first
    i += 2
mnemonic = {}
dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", elf], capture_output=True,
                     text=True, check=True).stdout
for l in dis.splitlines():
    m = re.match(r"^\s*(ffffffff[0-9a-f]+):\s+(\S+)", l)
    if m:
        mnemonic[m.group(1)] = m.group(2)
for n, pc in enumerate(seq):
    if lo <= n < hi and mnemonic.get(pc) == "rdtsc":
        print("rdtsc at instruction %d: %s" % (n, " < ".join(reversed(frames[pc][-3:]))))
stack, totals = [], collections.Counter()
for n, pc in enumerate(seq):
    chain = frames[pc]
    if lo <= n < hi:
        totals[tuple([f for fr in stack for f in fr] + chain)[:depth]] += 1
    m = mnemonic.get(pc, "")
    if m.startswith("call"):
        stack.append(chain)
    elif m.startswith("ret") and stack:
        stack.pop()
tree, children = collections.Counter(), collections.defaultdict(set)
for k, v in totals.items():
    for d in range(1, len(k) + 1):
        tree[k[:d]] += v
        children[k[:d - 1]].add(k[:d])


def show(prefix, indent):
    for k in sorted(children[prefix], key=lambda k: -tree[k]):
        if tree[k] >= least:
            print("%7d %s%s" % (tree[k], "  " * indent, re.sub(r"<.*", "", k[-1])[-80:]))
            show(k, indent + 1)


print("%d instructions" % (hi - lo))
show((), 0)
