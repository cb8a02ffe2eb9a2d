"""REDIConfig (``trl_ext.redi.config``): DPO options REDI would silently ignore are refused, DPO's defaults pass."""

import pytest

from peft_trl_testbed import toy_args
from trl_ext import REDIConfig

NON_DEFAULT = {
    "beta": 0.5,
    "loss_type": ["ipo"],
    "loss_weights": [1.0],
    "label_smoothing": 0.1,
    "precompute_ref_log_probs": True,
    "precompute_ref_batch_size": 8,
    "sync_ref_model": True,
    "ref_model_mixup_alpha": 0.9,
    "ref_model_sync_steps": 64,
    "ld_alpha": 0.5,
    "f_divergence_type": "js_divergence",
    "f_alpha_divergence_coef": 0.3,
    "discopop_tau": 0.1,
    "use_weighting": True,
}


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_redi_config_refuses_dpo_only_options(tmp_path, name):
    with pytest.raises(ValueError, match=rf"REDIConfig got {name}=.*Remove {name}"):
        toy_args(REDIConfig, tmp_path, **{name: NON_DEFAULT[name]})


def test_redi_config_accepts_dpo_defaults_and_refuses_a_bool_alpha(tmp_path):
    toy_args(REDIConfig, tmp_path, beta=0.1, loss_type="sigmoid", f_divergence_type="reverse_kl")
    with pytest.raises(ValueError, match=r"redi_alpha=True is a bool"):
        toy_args(REDIConfig, tmp_path, redi_alpha=True)
