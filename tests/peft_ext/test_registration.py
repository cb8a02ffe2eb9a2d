"""Registration: the package's types resolve like built-in ones, clashes are refused, and registering them is
the only thing ``import peft_ext`` does to PEFT (no class attribute of PEFT, transformers or torch changes)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import peft_ext
from peft_ext.registration import register_tuner


def test_package_types_are_registered_like_builtin_ones():
    for name, config_cls, model_cls in (
        ("MORA", peft_ext.MoraConfig, peft_ext.MoraModel),
        ("SUBNET", peft_ext.SubnetConfig, peft_ext.SubnetModel),
    ):
        member = PeftType(name)  # the lookup PeftConfig.from_pretrained does on adapter_config.json
        assert member is PeftType[name] and member.value == name and member in list(PeftType)
        assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is config_cls
        assert PEFT_TYPE_TO_TUNER_MAPPING[member] is model_cls


def test_registering_again_is_a_no_op_and_a_clash_is_refused():
    mora = dict(config_cls=peft_ext.MoraConfig, model_cls=peft_ext.MoraModel, prefix="mora_")
    assert register_tuner(name="mora", **mora) is PeftType.MORA
    with pytest.raises(KeyError, match="already registered to MoraConfig"):
        register_tuner(name="mora", config_cls=peft_ext.SubnetConfig, model_cls=peft_ext.SubnetModel, prefix="x_")


REPO_ROOT = Path(__file__).resolve().parents[2]
IMPORT_SCRIPT = textwrap.dedent(
    """
    import json
    import peft, torch, transformers
    from peft import PeftConfig, PeftMixedModel, PeftModel, mapping
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    from peft.utils import PeftType

    def with_subclasses(cls):
        found, todo = [], [cls]
        while todo:
            c = todo.pop()
            if c not in found:
                found.append(c)
                todo.extend(c.__subclasses__())
        return found

    roots = [PeftModel, PeftMixedModel, BaseTuner, BaseTunerLayer, PeftConfig, transformers.PreTrainedModel]
    classes = {c for root in roots for c in with_subclasses(root)}
    classes |= {torch.nn.Module, transformers.Trainer, transformers.TrainerCallback}
    before = {c: dict(vars(c)) for c in classes}
    members = list(PeftType.__members__)
    mappings = {n: dict(getattr(mapping, n)) for n in dir(mapping) if n.startswith("PEFT_TYPE_TO_")}

    import peft_ext

    changed = sorted(
        f"{c.__module__}.{c.__qualname__}.{name}"
        for c, old in before.items()
        for name in set(old) | set(vars(c))
        if name not in old or name not in vars(c) or vars(c)[name] is not old[name]
    )
    print(json.dumps({
        "classes_checked": len(before),
        "changed_attributes": changed,
        "peft_types_added": [m for m in PeftType.__members__ if m not in members],
        "mapping_keys_added": {
            n: sorted(getattr(k, "value", k) for k in getattr(mapping, n) if k not in old)
            for n, old in mappings.items()
        },
    }))
    """
)


def test_import_changes_no_class_attribute_and_only_adds_the_two_peft_types(tmp_path):
    """In a fresh interpreter: ``vars()`` of PeftModel, PeftMixedModel, BaseTuner, BaseTunerLayer, PeftConfig,
    PreTrainedModel (each with every subclass loaded, LoraModel and PeftModelForCausalLM included), nn.Module,
    Trainer and TrainerCallback, before and after ``import peft_ext``."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_SCRIPT], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print("import peft, peft_ext:", report)  # shown with pytest -s
    assert report["classes_checked"] > 100  # the tuners, models and configs PEFT defines are all in the snapshot
    assert report["changed_attributes"] == []
    assert report["peft_types_added"] == ["MORA", "SUBNET"]
    assert {n: keys for n, keys in report["mapping_keys_added"].items() if keys} == {
        n: ["MORA", "SUBNET"]
        for n in ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING")
    }
