# gdb side of bench/gdbtrace/run.sh: connect to QEMU's gdbstub, stop at the TSTART address
# (after TSKIP earlier hits), then single-step TSTEPS instructions and write each RIP (hex, one
# per line) to TOUT. Under `-icount shift=0,sleep=off` one step is one guest instruction.
import os

import gdb

start = int(os.environ["TSTART"], 16)
skip = int(os.environ.get("TSKIP", "10"))
steps = int(os.environ.get("TSTEPS", "6000"))
out = os.environ["TOUT"]
gdb.execute("set pagination off")
gdb.execute("set confirm off")
gdb.execute("target remote 127.0.0.1:%s" % os.environ.get("TPORT", "1239"))
gdb.execute("hbreak *0x%x" % start)
gdb.execute("ignore 1 %d" % skip)
gdb.execute("continue")
gdb.execute("delete")
with open(out, "w") as f:
    for _ in range(steps):
        pc = int(gdb.parse_and_eval("$pc")) & 0xFFFFFFFFFFFFFFFF
        f.write("%x\n" % pc)
        gdb.execute("stepi", to_string=True)
gdb.execute("kill")
gdb.execute("quit")
