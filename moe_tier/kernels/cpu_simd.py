"""Row dot products written as LLVM vector IR (numba intrinsics), where numba's own loops fall short.

Q2_K..Q6_K: numba's loops decoded each super-block into int16 values and scalar scales, then dotted in 32-bit
lanes, at 0.1x (Q2_K) to 0.5x (Q4_K) llama.cpp's speed. This is ggml_vec_dot_q{2..6}_K_q8_K's AVX2 path
(ggml-cpu/arch/x86/quants.c) instead, a whole row per call: scales unpacked as vectors, 32 quants at a time,
vpmaddubsw (unsigned quant x signed int8, pairs summed in int16: |2 * 63 * 128| < 2**15, never saturating;
Q3_K's and Q6_K's quants stored with an offset, which comes off afterwards through the bsums),
vpmaddwd by the scales (LLVM fuses the int32 accumulation into vpdpwssd where AVX512-VNNI exists), and, as in
ggml, 8 int32 lanes per block converted to float and accumulated in 8 float lanes, summed once per row. Without
AVX2 the same integer sums come from generic vector IR (widen, multiply, add) that LLVM lowers for the target.
Q4_0 (32-value blocks, Q8_0 activations) is ggml_vec_dot_q4_0_q8_0's AVX2 loop the same way (0.4x -> 1x).
Integer sums are exact either way and fp16 scales are read exactly either way; only float rounding differs
from llama.cpp's (its lanes hold other partial sums), as with every other kernel here.

The x86 lowering (AVX2 and F16C) is chosen by the features numba compiles for (its codegen's magic tuple, which
also keys numba's cache, so a cached kernel never meets a CPU it was not built for). numba's cache hashes only
the calling function's file: after editing this one, clear cpu_kquants' and cpu's entries in
kernels/__pycache__.

Shape key for one weight row of NB super-blocks (QK_K = 256 values; 84, 110, 144, 176 or 210 bytes each for
Q2_K..Q6_K) and a token i:
  w[wo:][:NB * block_bytes]             uint8    the raw blocks
  x[xo + i * x_step:][:NB * 256]        int8     the token's Q8_K values
  xd[xdo + i * xd_step:][:NB]           float32  their scales, one per super-block
  bsum[bo + i * bsum_step:][:NB * 16]   int32    their sums per 16 (Q8_K's bsums)
Arrays must be C-contiguous; offsets are elements of the flat data and are not bounds-checked.
"""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.registry import cpu_target
from numba.extending import intrinsic

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
QK_K, _ = GGML_QUANT_SIZES[Q.Q8_K]
_TARGET_FEATURES = cpu_target.target_context.codegen().magic_tuple()[2].split(",")
HAS_X86 = "+avx2" in _TARGET_FEATURES and "+f16c" in _TARGET_FEATURES


def _vec(elem: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(elem, n)


def _load(builder, base, offset: int, ty: ir.Type, align: int):
    """A ty loaded from base (an element pointer) + offset elements; align: what the data guarantees."""
    ptr = builder.gep(base, [ir.Constant(_I64, offset)]) if offset else base
    return builder.load(builder.bitcast(ptr, ty.as_pointer()), align=align)


def _row_sums(context, builder, signature, accs):
    """Each token's 8 float lanes summed once per row, as ggml does, returned as the intrinsic's tuple."""
    values = [_intrinsic_fn(builder, "llvm.vector.reduce.fadd.v8f32", ir.FloatType(),
                            [ir.Constant(ir.FloatType(), 0.0), builder.load(acc)]) for acc in accs]
    return context.make_tuple(builder, signature.return_type, values)


def _intrinsic_fn(builder, name: str, ret: ir.Type, args: list):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _f16_to_f32(builder, h, f16c: bool):
    """<n x i16> fp16 bits -> <n x float>, exactly (subnormals, inf, NaN too). LLVM's fpext is one vcvtph2ps
    with F16C, else a compiler-rt call numba's JIT lacks (a crash), so without F16C: integer ops (F. Giesen's
    half_to_float: move exponent and mantissa into place, rebias, fix up inf / NaN, renormalise subnormals
    with one exact float subtraction)."""
    n = h.type.count
    i32, f32 = _vec(_I32, n), _vec(ir.FloatType(), n)
    if f16c:
        return builder.fpext(builder.bitcast(h, _vec(ir.HalfType(), n)), f32)

    def c(v):
        return ir.Constant(i32, [v] * n)

    h = builder.zext(h, i32)
    o = builder.shl(builder.and_(h, c(0x7FFF)), c(13))
    exp = builder.and_(o, c(0x0F800000))
    o = builder.add(o, c(112 << 23))
    o = builder.select(builder.icmp_unsigned("==", exp, c(0x0F800000)), builder.add(o, c(112 << 23)), o)
    sub = builder.fsub(builder.bitcast(builder.add(o, c(1 << 23)), f32), builder.bitcast(c(113 << 23), f32))
    o = builder.select(builder.icmp_unsigned("==", exp, c(0)), builder.bitcast(sub, i32), o)
    return builder.bitcast(builder.or_(o, builder.shl(builder.and_(h, c(0x8000)), c(16))), f32)


def _q4_k_scales_mins(builder, w):
    """get_scale_min_k4 for all 8 sub-blocks at once (ggml's utmp masks): (scales, mins) as <8 x i32>."""
    u0, u1, u2 = (_load(builder, w, 4 + 4 * i, _I32, 1) for i in range(3))

    def c(v):
        return ir.Constant(_I32, v)

    low6, low4, low2 = c(0x3F3F3F3F), c(0x0F0F0F0F), c(0x03030303)
    sc_hi = builder.or_(builder.and_(u2, low4), builder.shl(builder.and_(builder.lshr(u0, c(6)), low2), c(4)))
    mn_hi = builder.or_(builder.and_(builder.lshr(u2, c(4)), low4),
                        builder.shl(builder.and_(builder.lshr(u1, c(6)), low2), c(4)))
    words = ir.Constant(_vec(_I32, 4), None)
    for i, word in enumerate((builder.and_(u0, low6), sc_hi, builder.and_(u1, low6), mn_hi)):
        words = builder.insert_element(words, word, ir.Constant(_I32, i))
    bytes16 = builder.zext(builder.bitcast(words, _vec(_I8, 16)), _vec(_I32, 16))
    undef = ir.Constant(_vec(_I32, 16), None)
    scales = builder.shuffle_vector(bytes16, undef, ir.Constant(_vec(_I32, 8), list(range(8))))
    mins = builder.shuffle_vector(bytes16, undef, ir.Constant(_vec(_I32, 8), list(range(8, 16))))
    return scales, mins


def _group_scale(builder, scales, j: int, lanes: int, elem: ir.IntType):
    """The scale vector (lanes of elem) for group j of 32 values: scales (int32) hold one per 32 values (8,
    Q4_K: one scale narrowed, then broadcast) or one per 16 (16, Q6_K: each half of the lanes its own)."""

    def narrow(v, ty):
        return v if elem == _I32 else builder.trunc(v, ty)

    if scales.type.count == 8:
        scale = narrow(builder.extract_element(scales, ir.Constant(_I32, j)), elem)
        one, mask = builder.insert_element(ir.Constant(_vec(elem, lanes), None), scale, ir.Constant(_I32, 0)), [0]
    else:
        one, mask = narrow(scales, _vec(elem, 16)), [2 * j, 2 * j + 1]
    lane_mask = [k for k in mask for _ in range(lanes // len(mask))]
    return builder.shuffle_vector(one, one, ir.Constant(_vec(_I32, lanes), lane_mask))


def _sumi_avx2(builder, quants, xs, scales):
    """sum over groups j of 32 values of scale * (quants_j . xs_j), scales one per 32 or per 16 values (see
    _group_scale): vpmaddubsw (unsigned quant x signed x, adjacent pairs summed in int16), then vpmaddwd by the
    group's scales, in 8 int32 lanes."""
    acc = ir.Constant(_vec(_I32, 8), None)
    for j, (q, xv) in enumerate(zip(quants, xs)):
        pairs = _intrinsic_fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), [q, xv])
        scale = _group_scale(builder, scales, j, 16, _I16)
        acc = builder.add(acc, _intrinsic_fn(builder, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), [pairs, scale]))
    return acc


def _sumi_generic(builder, quants, xs, scales):
    """The same sums in 32 int32 lanes: int16 products (|63 * 128| fits), widened, times the scale."""
    acc = ir.Constant(_vec(_I32, 32), None)
    for j, (q, xv) in enumerate(zip(quants, xs)):
        prod = builder.mul(builder.zext(q, _vec(_I16, 32)), builder.sext(xv, _vec(_I16, 32)))
        scale = _group_scale(builder, scales, j, 32, _I32)
        acc = builder.add(acc, builder.mul(builder.sext(prod, _vec(_I32, 32)), scale))
    return acc


def _broadcast(builder, value, n: int):
    one = builder.insert_element(ir.Constant(_vec(value.type, n), None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, one, ir.Constant(_vec(_I32, n), [0] * n))


def _f16_at(builder, w, offset: int, count: int, f16c: bool):
    """count fp16 values at byte offset of the block, as float32 scalars."""
    v = _f16_to_f32(builder, _load(builder, w, offset, _vec(_I16, count), 1), f16c)
    return [builder.extract_element(v, ir.Constant(_I32, i)) for i in range(count)]


def _pairs16(builder, prod):
    """<16 x i32> per-16 values -> <8 x i32>, adjacent pairs added (the lanes sumi8 holds per 32)."""
    even, odd = (ir.Constant(_vec(_I32, 8), list(range(k, 16, 2))) for k in (0, 1))
    return builder.add(*(builder.shuffle_vector(prod, prod, half) for half in (even, odd)))


def _unpack_q4_k(builder, w, f16c: bool, fifth_bit: bool = False):
    """d | dmin | scales[12] | qs[128]: 8 groups of 32 nibbles (low, then high nibbles of each 32 bytes), a
    6-bit scale and minimum per group. Terms: d * sumi - dmin * (mins . bsums per 32). With fifth_bit (Q5_K),
    qh[32] sits before qs and bit j of its byte l is bit 4 of group j's quant l."""
    scales, mins = _q4_k_scales_mins(builder, w)

    def c(v):
        return ir.Constant(_vec(_I8, 32), [v] * 32)

    qh = _load(builder, w, 16, _vec(_I8, 32), 1) if fifth_bit else None
    quants = []
    for n in range(4):
        q = _load(builder, w, (48 if fifth_bit else 16) + 32 * n, _vec(_I8, 32), 1)
        for j, nibble in ((2 * n, builder.and_(q, c(15))), (2 * n + 1, builder.lshr(q, c(4)))):
            if fifth_bit:
                nibble = builder.or_(nibble, builder.shl(builder.and_(builder.lshr(qh, c(j)), c(1)), c(4)))
            quants.append(nibble)
    d, dmin = _f16_at(builder, w, 0, 2, f16c)

    def terms(builder, sumi8, bsum16):
        bsum32 = _pairs16(builder, bsum16)
        return [(sumi8, d), (builder.mul(mins, bsum32), builder.fneg(dmin))]

    return quants, scales, terms


def _offset_terms(scales16, shift: int, d):
    """Terms for quants stored as value + 2**shift with one scale per 16: d * (sumi - 2**shift * (scales .
    bsums)), the offset subtracted in int32 lanes as ggml's q8sclsub."""

    def terms(builder, sumi8, bsum16):
        offset = _pairs16(builder, builder.mul(scales16, bsum16))
        return [(builder.sub(sumi8, builder.shl(offset, ir.Constant(_vec(_I32, 8), [shift] * 8))), d)]

    return terms


def _two_bit_quants(builder, qs, n: int):
    """The 4 groups of 32 2-bit quants of qs's bytes n*32..n*32+31 (bit pairs 0-1, 2-3, 4-5, 6-7)."""
    q = _load(builder, qs, 32 * n, _vec(_I8, 32), 1)
    three = ir.Constant(_vec(_I8, 32), [3] * 32)
    return [builder.and_(builder.lshr(q, ir.Constant(_vec(_I8, 32), [2 * j] * 32)) if j else q, three)
            for j in range(4)]


def _unpack_q2_k(builder, w, f16c: bool):
    """scales[16] | qs[64] | d | dmin: per 128 values, groups of 32 are the bit pairs of 32 bytes; per 16 a
    low-nibble scale and a high-nibble minimum. Terms: d * sumi - dmin * (mins . bsums)."""
    packed = builder.zext(_load(builder, w, 0, _vec(_I8, 16), 1), _vec(_I32, 16))
    scales = builder.and_(packed, ir.Constant(_vec(_I32, 16), [15] * 16))
    mins = builder.lshr(packed, ir.Constant(_vec(_I32, 16), [4] * 16))
    qs = builder.gep(w, [ir.Constant(_I64, 16)])
    quants = [q for n in range(2) for q in _two_bit_quants(builder, qs, n)]
    d, dmin = _f16_at(builder, w, 80, 2, f16c)

    def terms(builder, sumi8, bsum16):
        return [(sumi8, d), (_pairs16(builder, builder.mul(mins, bsum16)), builder.fneg(dmin))]

    return quants, scales, terms


def _q3_k_scales(builder, w):
    """The 16 6-bit scales - 32 as <16 x i32> (ggml's aux / kmask1 / kmask2 unpacking of scales[12])."""
    a0, a1, tmp = (_load(builder, w, 96 + 4 * i, _I32, 1) for i in range(3))

    def c(v):
        return ir.Constant(_I32, v)

    low4, low2 = c(0x0F0F0F0F), c(0x03030303)

    def word(a, shift_a, shift_t):
        low = builder.and_(builder.lshr(a, c(shift_a)) if shift_a else a, low4)
        high = builder.and_(builder.lshr(tmp, c(shift_t)) if shift_t else tmp, low2)
        return builder.or_(low, builder.shl(high, c(4)))

    words = ir.Constant(_vec(_I32, 4), None)
    for i, value in enumerate((word(a0, 0, 0), word(a1, 0, 2), word(a0, 4, 4), word(a1, 4, 6))):
        words = builder.insert_element(words, value, c(i))
    raw = builder.zext(builder.bitcast(words, _vec(_I8, 16)), _vec(_I32, 16))
    return builder.sub(raw, ir.Constant(_vec(_I32, 16), [32] * 16))


def _unpack_q3_k(builder, w, f16c: bool):
    """hmask[32] | qs[64] | scales[12] | d: Q2_K's bit pairs plus a third bit, bit g of hmask byte l for group
    g's quant l; value = quant - 4 (ggml subtracts 4 where the bit is clear: the same), a 6-bit scale - 32 per
    16. Term: d * (sumi - 4 * (scales . bsums))."""
    qs = builder.gep(w, [ir.Constant(_I64, 32)])
    hmask = _load(builder, w, 0, _vec(_I8, 32), 1)

    def c(v):
        return ir.Constant(_vec(_I8, 32), [v] * 32)

    quants = []
    for n in range(2):
        for j, q in enumerate(_two_bit_quants(builder, qs, n)):
            g = 4 * n + j
            high = builder.and_(builder.lshr(hmask, c(g)) if g else hmask, c(1))
            quants.append(builder.or_(q, builder.shl(high, c(2))))
    (d,) = _f16_at(builder, w, 108, 1, f16c)
    scales16 = _q3_k_scales(builder, w)
    return quants, scales16, _offset_terms(scales16, 2, d)


def _unpack_q6_k(builder, w, f16c: bool):
    """ql[128] | qh[64] | scales[16] int8 | d: per 128 values, groups of 32 take 4 bits from ql (low nibbles of
    bytes 0-31, of 32-63, then their high nibbles) and 2 from qh (bit pairs 0-1, 2-3, 4-5, 6-7 of 32 bytes);
    value = quant - 32, one int8 scale per 16. Term: d * (sumi - 32 * (scales . bsums))."""
    scales16 = builder.sext(_load(builder, w, 192, _vec(_I8, 16), 1), _vec(_I32, 16))

    def c(v):
        return ir.Constant(_vec(_I8, 32), [v] * 32)

    quants = []
    for n in range(2):
        ql1, ql2 = (_load(builder, w, 64 * n + 32 * k, _vec(_I8, 32), 1) for k in (0, 1))
        qh = _load(builder, w, 128 + 32 * n, _vec(_I8, 32), 1)
        for j, low in enumerate((builder.and_(ql1, c(15)), builder.and_(ql2, c(15)),
                                 builder.lshr(ql1, c(4)), builder.lshr(ql2, c(4)))):
            high = builder.and_(builder.lshr(qh, c(2 * j)), c(3)) if j else builder.and_(qh, c(3))
            quants.append(builder.or_(low, builder.shl(high, c(4))))
    (d,) = _f16_at(builder, w, 208, 1, f16c)
    return quants, scales16, _offset_terms(scales16, 5, d)


def _unpack_q5_k(builder, w, f16c: bool):
    """d | dmin | scales[12] | qh[32] | qs[128]: Q4_K plus a fifth bit per quant."""
    return _unpack_q4_k(builder, w, f16c, fifth_bit=True)


_UNPACK = {Q.Q2_K: _unpack_q2_k, Q.Q3_K: _unpack_q3_k, Q.Q4_K: _unpack_q4_k, Q.Q5_K: _unpack_q5_k,
           Q.Q6_K: _unpack_q6_k}


def _element(builder, ptr, start, step, i: int, b, per_block: int):
    """ptr + start + i * step + b * per_block: token i's data for block b."""
    token_start = builder.add(start, builder.mul(step, _I64(i)))
    return builder.gep(ptr, [builder.add(token_start, builder.mul(b, _I64(per_block)))])


def _fold8(builder, v):
    """<8k x i32> -> <8 x i32>, slices of 8 added."""
    parts = [builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, 8), list(range(k, k + 8))))
             for k in range(0, v.type.count, 8)]
    while len(parts) > 1:
        parts = [builder.add(parts[k], parts[k + 1]) for k in range(0, len(parts), 2)]
    return parts[0]


def _typed(arrays, integers) -> bool:
    """The intrinsics' argument check: C-contiguous arrays of the given dtypes, integer offsets."""
    return (all(isinstance(a, types.Array) and a.dtype == dtype and a.layout == "C" for a, dtype in arrays)
            and all(isinstance(v, types.Integer) for v in integers))


def _rows(qtype: Q, x86: bool, n_tok: int):
    """An intrinsic (w, wo, n_blk, x, xo, x_step, xd, xdo, xd_step, bsum, bo, bsum_step) -> n_tok float32 dots of
    one weight row (n_blk super-blocks of qtype from w[wo]) with n_tok tokens: token i's values at
    x[xo + i * x_step], its per-block scales at xd[xdo + i * xd_step], its bsums at bsum[bo + i * bsum_step].
    Per block, the integer sums in 8 int32 lanes (exact), converted to float and accumulated in 8 float lanes
    times d * d_x (and -dmin * d_x for the minimums of Q2_K, Q4_K, Q5_K), summed across lanes once per row. The
    weights are unpacked once per block for all n_tok tokens."""
    unpack = _UNPACK[qtype]
    block_bytes = GGML_QUANT_SIZES[qtype][1]
    f32x8 = _vec(ir.FloatType(), 8)

    def typer(typingctx, w, wo, n_blk, x, xo, x_step, xd, xdo, xd_step, bsum, bo, bsum_step):
        if not _typed(((w, types.uint8), (x, types.int8), (xd, types.float32), (bsum, types.int32)),
                      (wo, n_blk, xo, x_step, xdo, xd_step, bo, bsum_step)):
            return None
        sig = types.UniTuple(types.float32, n_tok)(w, wo, n_blk, x, xo, x_step, xd, xdo, xd_step, bsum, bo, bsum_step)

        def codegen(context, builder, signature, args):
            def int64(k):
                return context.cast(builder, args[k], signature.args[k], types.int64)

            def base(k):
                return context.make_array(signature.args[k])(context, builder, args[k]).data

            wo, n_blk, xo, x_step, xdo, xd_step, bo, b_step = (int64(k) for k in (1, 2, 4, 5, 7, 8, 10, 11))
            w, x, xd, bsum = (base(k) for k in (0, 3, 6, 9))
            accs = [cgutils.alloca_once_value(builder, ir.Constant(f32x8, None)) for _ in range(n_tok)]
            with cgutils.for_range(builder, n_blk) as loop:
                b = loop.index
                wp = builder.gep(w, [builder.add(wo, builder.mul(b, _I64(block_bytes)))])
                quants, scales, terms = unpack(builder, wp, f16c=x86)
                for i, acc in enumerate(accs):
                    xp, bp, xdp = (_element(builder, ptr, start, step, i, b, per_block) for ptr, start, step, per_block
                                   in ((x, xo, x_step, QK_K), (bsum, bo, b_step, 16), (xd, xdo, xd_step, 1)))
                    xs = [_load(builder, xp, 32 * j, _vec(_I8, 32), 1) for j in range(8)]
                    sumi8 = _fold8(builder, (_sumi_avx2 if x86 else _sumi_generic)(builder, quants, xs, scales))
                    d_x = builder.load(xdp)
                    total = builder.load(acc)
                    for lanes, coef in terms(builder, sumi8, _load(builder, bp, 0, _vec(_I32, 16), 4)):
                        scale = _broadcast(builder, builder.fmul(coef, d_x), 8)
                        total = builder.fadd(total, builder.fmul(builder.sitofp(lanes, f32x8), scale))
                    builder.store(total, acc)
            return _row_sums(context, builder, signature, accs)

        return sig, codegen

    typer.__name__ = f"{qtype.name.lower()}_rows{n_tok}"
    return intrinsic(typer)


def _q4_0_rows(x86: bool, n_tok: int):
    """An intrinsic (w, wo, n_blk, x, xo, x_step, xd, xdo, xd_step) -> n_tok float32 dots of one Q4_0 row (n_blk
    blocks of d | qs[16], value j = low nibble of byte j - 8, value j + 16 = its high nibble - 8) with n_tok
    Q8_0 tokens (values at x[xo + i * x_step], fp16-rounded scales at xd[xdo + i * xd_step]): ggml_vec_dot_q4_0_q8_0's
    AVX2 loop, per block 8 int32 lanes (exact) times d * d_x into 8 float lanes, summed once per row. ggml
    multiplies quant - 8 by x through vpsignb, wrong for an x of -128 (Q8_0 never makes one); here the x86
    lowering subtracts vpmaddubsw(8, x) from vpmaddubsw(quant, x) in int16 instead (|2 * 8 * 128| fits), exact
    for every int8."""
    block_bytes = GGML_QUANT_SIZES[Q.Q4_0][1]
    f32x8, i8x32 = _vec(ir.FloatType(), 8), _vec(_I8, 32)

    def typer(typingctx, w, wo, n_blk, x, xo, x_step, xd, xdo, xd_step):
        if not _typed(((w, types.uint8), (x, types.int8), (xd, types.float32)), (wo, n_blk, xo, x_step, xdo, xd_step)):
            return None
        sig = types.UniTuple(types.float32, n_tok)(w, wo, n_blk, x, xo, x_step, xd, xdo, xd_step)

        def codegen(context, builder, signature, args):
            wo, n_blk, xo, x_step, xdo, xd_step = (context.cast(builder, args[k], signature.args[k], types.int64)
                                                   for k in (1, 2, 4, 5, 7, 8))
            w, x, xd = (context.make_array(signature.args[k])(context, builder, args[k]).data for k in (0, 3, 6))
            accs = [cgutils.alloca_once_value(builder, ir.Constant(f32x8, None)) for _ in range(n_tok)]
            with cgutils.for_range(builder, n_blk) as loop:
                b = loop.index
                wp = builder.gep(w, [builder.add(wo, builder.mul(b, _I64(block_bytes)))])
                qs = _load(builder, wp, 2, _vec(_I8, 16), 1)
                low = builder.and_(qs, ir.Constant(_vec(_I8, 16), [15] * 16))
                high = builder.lshr(qs, ir.Constant(_vec(_I8, 16), [4] * 16))
                quants = builder.shuffle_vector(low, high, ir.Constant(_vec(_I32, 32), list(range(32))))
                (d,) = _f16_at(builder, wp, 0, 1, x86)
                for i, acc in enumerate(accs):
                    xv = _load(builder, _element(builder, x, xo, x_step, i, b, 32), 0, i8x32, 1)
                    if x86:
                        def pairs(q):
                            return _intrinsic_fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), [q, xv])

                        diff = builder.sub(pairs(quants), pairs(ir.Constant(i8x32, [8] * 32)))
                        lanes = _intrinsic_fn(builder, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8),
                                              [diff, ir.Constant(_vec(_I16, 16), [1] * 16)])
                    else:
                        values = builder.sub(quants, ir.Constant(i8x32, [8] * 32))
                        prod = builder.mul(builder.sext(values, _vec(_I16, 32)), builder.sext(xv, _vec(_I16, 32)))
                        lanes = _fold8(builder, builder.sext(prod, _vec(_I32, 32)))
                    d_x = builder.load(_element(builder, xd, xdo, xd_step, i, b, 1))
                    scale = _broadcast(builder, builder.fmul(d, d_x), 8)
                    term = builder.fmul(builder.sitofp(lanes, f32x8), scale)
                    builder.store(builder.fadd(builder.load(acc), term), acc)
            return _row_sums(context, builder, signature, accs)

        return sig, codegen

    typer.__name__ = f"q4_0_rows{n_tok}"
    return intrinsic(typer)


# (qtype, x86, tokens per call) -> intrinsic; tests run every lowering. Four tokens per call share the
# unpacking (1.5x at 64 tokens, prefill); one token per call takes the rest.
LOWERINGS = {(q, x86, n): _rows(q, x86, n) for q in _UNPACK for x86 in (False, True) for n in (1, 4)}
LOWERINGS.update({(Q.Q4_0, x86, n): _q4_0_rows(x86, n) for x86 in (False, True) for n in (1, 4)})
q4_0_rows1, q4_0_rows4 = LOWERINGS[Q.Q4_0, HAS_X86, 1], LOWERINGS[Q.Q4_0, HAS_X86, 4]
q2_k_rows1, q2_k_rows4 = LOWERINGS[Q.Q2_K, HAS_X86, 1], LOWERINGS[Q.Q2_K, HAS_X86, 4]
q3_k_rows1, q3_k_rows4 = LOWERINGS[Q.Q3_K, HAS_X86, 1], LOWERINGS[Q.Q3_K, HAS_X86, 4]
q4_k_rows1, q4_k_rows4 = LOWERINGS[Q.Q4_K, HAS_X86, 1], LOWERINGS[Q.Q4_K, HAS_X86, 4]
q5_k_rows1, q5_k_rows4 = LOWERINGS[Q.Q5_K, HAS_X86, 1], LOWERINGS[Q.Q5_K, HAS_X86, 4]
q6_k_rows1, q6_k_rows4 = LOWERINGS[Q.Q6_K, HAS_X86, 1], LOWERINGS[Q.Q6_K, HAS_X86, 4]
