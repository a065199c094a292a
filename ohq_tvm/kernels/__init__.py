"""Hand-laid-out integer kernels that use the CPU's dot-product instructions (x86 VNNI / AVX2, AArch64
sdot), their fp32 multiply-add form for float 1x1 convs on maps no vector width divides, and the depthwise
plane kernel.

Importing the package registers their tensor intrinsics and MetaSchedule rule.
"""

from .depthwise import MAX_EXACT_TAPS, depthwise_conv2d_planes
from .int8_dot import (
    conv2d_dot,
    conv2d_dot_pixels,
    dense_dot,
    pack_conv2d_weight,
    pack_conv2d_weight_pixels,
    pack_dense_weight,
    pixel_lanes,
)
from .isa import (
    AVX2,
    AVX512_VNNI,
    AVX_VNNI,
    ISAS,
    NEON,
    SDOT,
    DotProductISA,
    dot_product_isa,
    float_isa,
    usable_isas,
)
from .schedule import has_dot_kernel, schedule_default

__all__ = [
    "AVX2",
    "AVX512_VNNI",
    "AVX_VNNI",
    "ISAS",
    "MAX_EXACT_TAPS",
    "NEON",
    "SDOT",
    "DotProductISA",
    "conv2d_dot",
    "conv2d_dot_pixels",
    "dense_dot",
    "depthwise_conv2d_planes",
    "dot_product_isa",
    "float_isa",
    "has_dot_kernel",
    "pack_conv2d_weight",
    "pack_conv2d_weight_pixels",
    "pack_dense_weight",
    "pixel_lanes",
    "schedule_default",
    "usable_isas",
]
