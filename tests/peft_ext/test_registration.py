"""The registration helper: PeftType is extended once, lookups work, clashes and PEFT changes fail clearly."""

import pytest
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import peft_ext
from peft_ext import registration
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
    assert register_tuner(name="mora", config_cls=peft_ext.MoraConfig, model_cls=peft_ext.MoraModel,
                          prefix="mora_") is PeftType.MORA  # fmt: skip
    with pytest.raises(KeyError, match="already registered to MoraConfig"):
        register_tuner(name="mora", config_cls=peft_ext.SubnetConfig, model_cls=peft_ext.SubnetModel, prefix="x_")


def test_extending_adds_one_member():
    before = len(PeftType)
    member = registration._extend_peft_type("TEST_EXTENSION_ONLY")
    assert member is PeftType("TEST_EXTENSION_ONLY") and len(PeftType) == before + 1
    assert registration._extend_peft_type("TEST_EXTENSION_ONLY") is member and len(PeftType) == before + 1


def test_incompatible_peft_internals_fail_clearly(monkeypatch):
    class NotAnEnum:
        pass

    monkeypatch.setattr(registration, "PeftType", NotAnEnum)
    with pytest.raises(RuntimeError, match="no longer a str Enum"):
        registration._extend_peft_type("ANYTHING")
