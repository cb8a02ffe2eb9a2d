"""Every private upstream name that ``peft_ext`` touches, in one place.

Each entry names the upstream version and file it mirrors and the test that pins it.
"""

from __future__ import annotations


def unpack_cpu_4bit_weight(weight) -> None:
    """Undo bitsandbytes' CPU inference repacking of a ``Params4bit`` in place, if it was repacked.

    bitsandbytes 0.50.2 (``bitsandbytes/nn/modules.py``, ``Linear4bit.forward``) repacks a 4-bit weight into
    a bf16 CPU kernel layout on the first eval-mode forward on CPUs with AVX512-BF16, and
    ``dequantize_4bit`` does not read that layout. bitsandbytes itself undoes it with the private
    ``bitsandbytes.functional._convert_weight_packed_for_cpu_inverse`` before saving; so do we before
    dequantising (it repacks on the next eval forward). Pinned by
    ``tests/peft_ext/test_quantized.py::test_dense_weight_of_a_repacked_4bit_layer``.
    """
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
