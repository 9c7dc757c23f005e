"""The kernel text MLX builds from a `mx.fast.metal_kernel` call, rebuilt in Python, and
the check that a kernel only uses what the emulator models.

`generate` follows MLX 0.32's `metal_kernel` / `write_signature` (mlx/backend/metal
custom-kernel code) token for token, quirks included:
- an input gets `<name>_shape` / `_strides` / `_ndim` buffers when that substring occurs
  anywhere in `source` (comments too, and `dx_shape` counts for input `x`);
- a `[[attribute]]` parameter is added when its name occurs anywhere in `source` (so
  `dispatch_threads_per_threadgroup` also brings `threads_per_threadgroup`);
- inputs with fewer than 8 elements are `const constant T*`, others `const device T*`,
  0-d inputs `const constant T&`;
- the kernel name encodes template values and input/output dtypes.
tests/test_metal_kernels.py compares this text with what MLX itself prints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import mlx.core as mx

MAX_CONSTANT_ARRAY_SIZE = 8

# (name, type) in MLX's order, which is the order of the generated parameters.
METAL_ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)
UNMODELLED_ATTRIBUTES = frozenset(a for a, _ in METAL_ATTRIBUTES if "quadgroup" in a)

# MLX's get_type_string, restricted to the dtypes the prelude defines.
TYPE_STRINGS = {
    mx.bool_: "bool",
    mx.uint8: "uint8_t",
    mx.uint16: "uint16_t",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
    mx.int8: "int8_t",
    mx.int16: "int16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.float16: "float16_t",
    mx.bfloat16: "bfloat16_t",
    mx.float32: "float",
}


class HarnessError(RuntimeError):
    """The emulator cannot run this kernel faithfully (unmodelled construct, bad launch,
    divergent simdgroup op, out-of-bounds write, compile error)."""


def type_string(dtype) -> str:
    try:
        return TYPE_STRINGS[dtype]
    except KeyError:
        raise HarnessError(f"dtype {dtype} is not modelled by metal_emu") from None


@dataclass(frozen=True)
class ArrayMeta:
    """What the generated text depends on: dtype, rank and element count."""

    dtype: object
    ndim: int
    size: int


@dataclass(frozen=True)
class Param:
    """One parameter of the generated kernel function, in order."""

    name: str
    role: str  # input | shape | strides | ndim | output | attribute
    ctype: str
    scalar: bool = False


@dataclass
class Generated:
    kernel_name: str
    text: str  # exactly what MLX appends to its Metal utilities and compiles
    call: str  # kernel_name plus template arguments, e.g. custom_kernel_f_float_3<float, 3>
    params: list[Param] = field(default_factory=list)
    # Where the user's header and body start in `text`, to map compiler lines back.
    header_span: tuple[int, int] = (0, 0)
    source_span: tuple[int, int] = (0, 0)


def _template_param_type(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, mx.Dtype):
        return "typename"
    raise HarnessError(f"template value {value!r} is not an int, bool or mlx dtype")


def _template_value(value) -> str:
    if isinstance(value, bool):
        return str(int(value))  # std::ostream prints bools as 1/0
    if isinstance(value, int):
        return str(value)
    return type_string(value)


def write_template(template) -> str:
    return "<" + ", ".join(_template_value(v) for _, v in template) + ">"


def generate(
    name: str,
    input_names,
    output_names,
    source: str,
    header: str,
    atomic_outputs: bool,
    inputs: list[ArrayMeta],
    output_dtypes,
    template,
) -> Generated:
    """The kernel source MLX would compile for this call (without its utilities prelude)."""
    if len(inputs) != len(input_names):
        raise HarnessError(f"expected {len(input_names)} inputs, got {len(inputs)}")
    if len(output_dtypes) != len(output_names):
        raise HarnessError(f"expected {len(output_names)} output dtypes, got {len(output_dtypes)}")
    template = list(template or [])
    shape_infos = [
        (n + "_shape" in source, n + "_strides" in source, n + "_ndim" in source)
        for n in input_names
    ]
    attributes = [(a, t) for a, t in METAL_ATTRIBUTES if a in source]

    kernel_name = "custom_kernel_" + name
    template_def = ""
    if template:
        template_def = write_template(template)
        template_hash = re.sub(r"<|>|, ", "_", template_def)[:-1]
        kernel_name += "_" + template_hash
    for arr in inputs:
        kernel_name += "_" + type_string(arr.dtype)
        if arr.ndim == 0:
            kernel_name += "s"
        elif arr.size < MAX_CONSTANT_ARRAY_SIZE:
            kernel_name += "c"
    for dtype in output_dtypes:
        kernel_name += "_" + type_string(dtype)

    params: list[Param] = []
    ks = header
    header_span = (0, len(header))
    if template:
        ks += "template <"
        ks += ", ".join(f"{_template_param_type(v)} {n}" for n, v in template)
        ks += ">\n"
    ks += "[[kernel]] void " + kernel_name + "(\n"
    index = 0
    for n, arr, (has_shape, has_strides, has_ndim) in zip(input_names, inputs, shape_infos):
        ctype = type_string(arr.dtype)
        location = "constant" if arr.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if arr.ndim == 0 else "*"
        ks += f"  const {location} {ctype}{ref} {n} [[buffer({index})]],\n"
        params.append(Param(n, "input", ctype, scalar=arr.ndim == 0))
        index += 1
        if arr.ndim > 0:
            if has_shape:
                ks += f"  const constant int* {n}_shape [[buffer({index})]],\n"
                params.append(Param(n + "_shape", "shape", "int"))
                index += 1
            if has_strides:
                ks += f"  const constant int64_t* {n}_strides [[buffer({index})]],\n"
                params.append(Param(n + "_strides", "strides", "int64_t"))
                index += 1
            if has_ndim:
                ks += f"  const constant int& {n}_ndim [[buffer({index})]],\n"
                params.append(Param(n + "_ndim", "ndim", "int", scalar=True))
                index += 1
    for n, dtype in zip(output_names, output_dtypes):
        ctype = type_string(dtype)
        ks += "  device "
        ks += f"atomic<{ctype}>" if atomic_outputs else ctype
        ks += f"* {n} [[buffer({index})]]"
        # MLX's own comma test, which compares a buffer index with an array count.
        if index < len(inputs) + len(output_names) - 1 or attributes:
            ks += ",\n"
        else:
            ks += ") {\n"
        params.append(Param(n, "output", ctype))
        index += 1
    for i, (a, t) in enumerate(attributes):
        ks += f"  {t} {a} [[{a}]]"
        ks += ",\n" if i < len(attributes) - 1 else ") {\n"
        params.append(Param(a, "attribute", t))
    source_span = (len(ks), len(ks) + len(source))
    ks += source
    ks += "\n}\n"

    call = kernel_name
    if template:
        call = kernel_name + template_def
        ks += (
            f'\ntemplate [[host_name("{kernel_name}")]] [[kernel]] '
            f"decltype({call}) {call};\n"
        )
    return Generated(kernel_name, ks, call, params, header_span, source_span)


# ---- what the emulator models ------------------------------------------------------------

_KEYWORDS = frozenset(
    """auto bool break case char const constexpr continue default do else enum false float
    for if inline int long return short signed sizeof static_assert static_cast struct
    switch template true typename unsigned using void while""".split()
)
_TYPES = frozenset(
    """uint ushort ulong half float16_t bfloat16_t bfloat uint2 uint3 int8_t int16_t int32_t
    int64_t uint8_t uint16_t uint32_t uint64_t size_t""".split()
)
# Everything prelude.hpp defines in namespace metal (usable qualified or not).
_METAL_FUNCTIONS = frozenset(
    """fabs abs fmin fmax min max trunc floor ceil fma copysign sqrt rsqrt exp log tanh
    isnan isinf select simd_sum simd_max simd_min simd_broadcast simd_shuffle
    simd_shuffle_down simd_shuffle_up simd_shuffle_xor threadgroup_barrier simdgroup_barrier
    mem_flags mem_none mem_device mem_threadgroup mem_texture""".split()
)
_PRECISE_FUNCTIONS = frozenset("exp log sqrt tanh".split())
_ADDRESS_SPACES = frozenset(("thread", "threadgroup"))
_NAMESPACES = frozenset(("metal", "precise"))

ALLOWED_BUILTINS = _KEYWORDS | _TYPES | _METAL_FUNCTIONS | _ADDRESS_SPACES | _NAMESPACES

_REJECTED = {
    "device": "names the `device` address space; MLX passes inputs with fewer than 8 "
    "elements in `constant` memory instead, so such code compiles for some shapes only. "
    "Index the kernel arguments directly.",
    "constant": "names the `constant` address space (see `device`).",
}

# Loop unrolling is an optimisation hint with no effect on results: a C++ compiler that
# does not know it ignores it (clang, Apple's included, honours it).
UNROLL_PRAGMA = re.compile(r"\s*#\s*pragma\s+clang\s+loop\s+unroll\(full\)\s*")

_TOKEN = re.compile(
    r"(?P<num>(?:\d|\.\d)[\w.]*(?:[eEpP][+-]\d+\w*)?)|(?P<id>[A-Za-z_]\w*)|(?P<op>::|->|\S)"
)


def strip_comments(text: str) -> str:
    """Comments and string/char literals blanked out (newlines kept)."""

    def blank(m):
        return re.sub(r"[^\n]", " ", m.group(0))

    return re.sub(
        r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', blank, text, flags=re.S
    )


def check_supported(
    source: str,
    header: str,
    input_names,
    output_names,
    template,
    atomic_outputs: bool,
    shape_names: list[str],
    attributes: list[str],
) -> None:
    """Raise HarnessError naming every construct the emulator does not model.

    Allowed: C++ keywords and the Metal types/functions prelude.hpp defines, the names the
    generated signature declares, template parameters, and identifiers the kernel itself
    declares as `TYPE name` (one declarator per declaration), members after `.`/`->`.
    """
    problems: list[str] = []
    if atomic_outputs:
        problems.append("atomic_outputs=True: `device atomic<T>*` outputs are not modelled")
    for a in attributes:
        if a in UNMODELLED_ATTRIBUTES:
            problems.append(f"attribute [[{a}]]: quadgroups are not modelled")
    signature_names = set(input_names) | set(output_names) | set(shape_names) | set(attributes)
    template_names = {n for n, _ in (template or [])}
    type_names = set(_TYPES) | {"float", "int", "bool", "short", "long", "char", "auto", "void"}
    type_names |= {n for n, v in (template or []) if isinstance(v, mx.Dtype)}

    parts = []
    declared: set[str] = set()
    for part_name, part in (("header", header), ("source", source)):
        text = strip_comments(part)
        lines = text.splitlines()
        for lineno, line in enumerate(lines, 1):
            if UNROLL_PRAGMA.fullmatch(line):
                following = next((ln for ln in lines[lineno:] if ln.strip()), "")
                if not following.lstrip().startswith("for "):
                    problems.append(f"{part_name} line {lineno}: {line.strip()!r} must precede a "
                                    "for loop")
            elif line.lstrip().startswith("#"):
                problems.append(
                    f"{part_name} line {lineno}: preprocessor directive {line.strip()!r}: "
                    "Metal headers cannot be included and macros are not scanned (the one "
                    "directive modelled is `#pragma clang loop unroll(full)`)"
                )
        text = "\n".join("" if UNROLL_PRAGMA.fullmatch(ln) else ln for ln in lines)
        type_names |= set(re.findall(r"\bstruct\s+([A-Za-z_]\w*)", text))
        tokens = [(m.lastgroup, m.group(m.lastgroup)) for m in _TOKEN.finditer(text)]
        parts.append((part_name, tokens))
    # Declarations anywhere count everywhere: the body calls the header's helpers.
    for _, tokens in parts:
        for i, (kind, tok) in enumerate(tokens):
            if kind != "id" or tok not in type_names:
                continue
            j = i + 1
            while j < len(tokens) and tokens[j][1] in ("*", "&"):
                j += 1
            if j < len(tokens) and tokens[j][0] == "id":
                declared.add(tokens[j][1])
    allowed = ALLOWED_BUILTINS | signature_names | template_names | declared | type_names
    for part_name, tokens in parts:
        for i, (kind, tok) in enumerate(tokens):
            if kind != "id":
                continue
            prev = tokens[i - 1][1] if i > 0 else ""
            qual = tokens[i - 2][1] if i > 1 and prev == "::" else ""
            if prev in (".", "->"):
                continue  # member access: the C++ compiler checks those
            if tok in _REJECTED:
                problems.append(f"{part_name}: `{tok}` {_REJECTED[tok]}")
            elif qual == "metal" and tok not in _METAL_FUNCTIONS | {"precise"}:
                problems.append(f"{part_name}: metal::{tok} is not modelled by metal_emu")
            elif qual == "precise" and tok not in _PRECISE_FUNCTIONS:
                problems.append(f"{part_name}: metal::precise::{tok} is not modelled by metal_emu")
            elif tok not in allowed:
                problems.append(
                    f"{part_name}: identifier `{tok}` is not modelled by metal_emu (nor declared "
                    "by the kernel as `TYPE name`)"
                )
    if problems:
        unique = list(dict.fromkeys(problems))
        raise HarnessError("kernel uses constructs metal_emu does not model:\n  " + "\n  ".join(unique))
