"""Integer widths in a kernel's TTIR: the offsets a program forms from its own index.

A program's row (or block) index times a row stride (or block size) is an element offset; in
32 bits it wraps once it passes 2^31 elements, so a kernel that runs a program per row (or a
loop over rows from ``tl.program_id``) forms it in 64 bits (``tl.program_id(0).to(tl.int64)``,
``tl.cast(row32, tl.int64)``). :func:`program_products` follows every value computed from
``tt.get_program_id`` (through arithmetic, splats, broadcasts and the lower bound of a loop)
to the integer multiplies it feeds, and sorts them by width. It does not follow a load (what
it reads is data, not an index) nor ``arith.trunci`` (a deliberate narrowing, such as the
32-bit counter words of Philox).
"""

from __future__ import annotations

import re

_VALUE = re.compile(r"%([\w$.-]+)")  # an SSA value; "%x#1" is result 1 of "%x:2"
_FOR = re.compile(r"scf\.for %([\w$.-]+) = %([\w$.-]+)")  # induction variable, lower bound
_ITER_ARG = re.compile(r"%([\w$.-]+) = %([\w$.-]+)")  # loop-carried value, its initial value
_STOPS = ("arith.trunci", "tt.load")  # their results do not carry the program index on


def program_products(ttir: str) -> tuple[list[str], list[str]]:
    """The integer multiplies (``arith.muli``) fed by the program id, as TTIR lines: those
    whose result is 64-bit, and the narrower ones (offsets that wrap past 2^31 elements)."""
    derived: set[str] = set()  # values computed from the program id
    wide, narrow = [], []
    for line in ttir.splitlines():
        code = line.split(" loc(")[0].strip()
        if "scf.for " in code:
            head, _, carried = code[code.index("scf.for ") :].partition("iter_args")
            loop = _FOR.match(head)
            if loop and loop[2] in derived:  # the induction variable starts at the lower bound
                derived.add(loop[1])
            inits = _ITER_ARG.findall(carried)
            derived.update(arg for arg, init in inits if init in derived)
            if code.startswith("%") and any(init in derived for _, init in inits):
                derived.update(v.split(":")[0] for v in _VALUE.findall(code.split("=", 1)[0]))
            continue
        if not code.startswith("%") or "=" not in code:
            continue
        lhs, rhs = code.split("=", 1)
        op = rhs.split()[0]
        results = [v.split(":")[0] for v in _VALUE.findall(lhs)]
        if op == "tt.get_program_id":
            derived.update(results)
            continue
        if op in _STOPS or not any(v.split("#")[0] in derived for v in _VALUE.findall(rhs)):
            continue
        derived.update(results)
        if op == "arith.muli":
            (wide if re.search(r"i64>?$", rhs.rsplit(":", 1)[1].strip()) else narrow).append(code)
    return wide, narrow
