"""Pure quantizer math (§1): functional uniform/log fake quantizers and nn.Module state holders.

No model knowledge lives here; everything broadcasts so that searches can evaluate a leading
candidate dimension in one call.
"""

from adalog.quant.log import (
    ADALOG_R,
    GELU_SHIFT,
    LOG_KINDS,
    Q_INIT,
    Q_MIN,
    adalog_denominator,
    adalog_dequant_exact,
    adalog_dequant_table,
    adalog_levels,
    adalog_lut_numerators,
    adalog_q_candidates,
    adalog_tables,
    log2_dequant,
    log_codes,
    log_dequant,
    log_fake_quant,
    logsqrt2_dequant,
    tables_to_levels,
)
from adalog.quant.modules import (
    IDENTITY_BITS,
    LogQuantizer,
    TwinUniformQuantizer,
    UniformQuantizer,
    check_n_bits,
)
from adalog.quant.uniform import (
    asym_codes,
    asym_dequant,
    asym_fake_quant,
    clamp_ste,
    round_ste,
    twin_codes,
    twin_dequant,
    twin_fake_quant,
)

__all__ = [
    "ADALOG_R",
    "GELU_SHIFT",
    "IDENTITY_BITS",
    "LOG_KINDS",
    "Q_INIT",
    "Q_MIN",
    "LogQuantizer",
    "TwinUniformQuantizer",
    "UniformQuantizer",
    "adalog_denominator",
    "adalog_dequant_exact",
    "adalog_dequant_table",
    "adalog_levels",
    "adalog_lut_numerators",
    "adalog_q_candidates",
    "adalog_tables",
    "asym_codes",
    "asym_dequant",
    "asym_fake_quant",
    "check_n_bits",
    "clamp_ste",
    "log2_dequant",
    "log_codes",
    "log_dequant",
    "log_fake_quant",
    "logsqrt2_dequant",
    "round_ste",
    "tables_to_levels",
    "twin_codes",
    "twin_dequant",
    "twin_fake_quant",
]
