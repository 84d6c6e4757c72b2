"""Unsigned 64-bit arithmetic that runs on Python ints and on z3 bit-vectors alike (style item 12).

The geometry formulas of `lamina.spec.proofs.layout` are written once against
this small interface.  `IntArith` evaluates them concretely, so they can be
compared with `lamina.spec.layout.Geometry`; `BitVecArith` builds 64-bit z3
terms and records, for every step, the condition under which that step does
not wrap around.  Proving all recorded conditions is proving that no offset
computation overflows.
"""
from __future__ import annotations

from typing import Any

import z3

WORD_BITS = 64


class IntArith:
    """The formulas on Python ints; every result is checked to fit an unsigned 64-bit word."""

    def __init__(self) -> None:
        self.no_wrap: list[bool] = []

    def _fits(self, value: int) -> int:
        self.no_wrap.append(0 <= value < 1 << WORD_BITS)
        return value

    def const(self, value: int) -> int:
        return value

    def add(self, a: int, b: int) -> int:
        return self._fits(a + b)

    def sub(self, a: int, b: int) -> int:
        return self._fits(a - b)

    def mul(self, a: int, b: int) -> int:
        return self._fits(a * b)

    def shl(self, a: int, n: int) -> int:
        return self._fits(a << n)

    def udiv(self, a: int, b: int) -> int:
        self.no_wrap.append(b != 0)
        return a // b

    def urem(self, a: int, b: int) -> int:
        self.no_wrap.append(b != 0)
        return a % b

    def umax(self, a: int, b: int) -> int:
        return max(a, b)

    def ult(self, a: int, b: int) -> bool:
        return a < b

    def ule(self, a: int, b: int) -> bool:
        return a <= b


class BitVecArith:
    """The formulas as 64-bit z3 terms (unsigned: `UDiv`, `LShR`, `ULT`), with no-wrap side conditions."""

    def __init__(self) -> None:
        self.no_wrap: list[z3.BoolRef] = []

    def const(self, value: int) -> z3.BitVecRef:
        return z3.BitVecVal(value, WORD_BITS)

    def add(self, a: Any, b: Any) -> z3.BitVecRef:
        self.no_wrap.append(z3.BVAddNoOverflow(a, b, False))
        return a + b

    def sub(self, a: Any, b: Any) -> z3.BitVecRef:
        self.no_wrap.append(z3.UGE(a, b))
        return a - b

    def mul(self, a: Any, b: Any) -> z3.BitVecRef:
        self.no_wrap.append(z3.BVMulNoOverflow(a, b, False))
        return a * b

    def shl(self, a: Any, n: Any) -> z3.BitVecRef:
        self.no_wrap.append(z3.And(z3.ULT(n, WORD_BITS), z3.LShR(a << n, n) == a))
        return a << n

    def udiv(self, a: Any, b: Any) -> z3.BitVecRef:
        self.no_wrap.append(b != 0)
        return z3.UDiv(a, b)

    def urem(self, a: Any, b: Any) -> z3.BitVecRef:
        self.no_wrap.append(b != 0)
        return z3.URem(a, b)

    def umax(self, a: Any, b: Any) -> z3.BitVecRef:
        return z3.If(z3.UGE(a, b), a, b)

    def ult(self, a: Any, b: Any) -> z3.BoolRef:
        return z3.ULT(a, b)

    def ule(self, a: Any, b: Any) -> z3.BoolRef:
        return z3.ULE(a, b)





class ExactArith:
    """The formulas as unbounded z3 integers, for one concrete cluster size at a time.

    With the cluster size fixed every product has a constant factor, so the
    terms stay linear and z3 decides orderings between regions at once, where
    64-bit multipliers make it crawl.  Each step records that its exact result
    lies in [0, 2**64): when all of them hold, the 64-bit evaluation of the
    same formulas computes exactly these values, so what is proved here holds
    for the bit-vectors too.
    """

    def __init__(self) -> None:
        self.no_wrap: list[z3.BoolRef] = []

    def _fits(self, value: z3.ArithRef) -> z3.ArithRef:
        self.no_wrap.append(z3.And(0 <= value, value < 2**WORD_BITS))
        return value

    def const(self, value: int) -> z3.ArithRef:
        return z3.IntVal(value)

    def add(self, a: Any, b: Any) -> z3.ArithRef:
        return self._fits(a + b)

    def sub(self, a: Any, b: Any) -> z3.ArithRef:
        return self._fits(a - b)

    def mul(self, a: Any, b: Any) -> z3.ArithRef:
        return self._fits(a * b)

    def shl(self, a: Any, n: int) -> z3.ArithRef:
        return self._fits(a * 2**n)

    def udiv(self, a: Any, b: Any) -> z3.ArithRef:
        self.no_wrap.append(b != 0)
        return a / b

    def urem(self, a: Any, b: Any) -> z3.ArithRef:
        self.no_wrap.append(b != 0)
        return a % b

    def umax(self, a: Any, b: Any) -> z3.ArithRef:
        return z3.If(a >= b, a, b)

    def ult(self, a: Any, b: Any) -> z3.BoolRef:
        return a < b

    def ule(self, a: Any, b: Any) -> z3.BoolRef:
        return a <= b
Arith = IntArith | BitVecArith | ExactArith
