"""Importing this module refuses unsupported trl, transformers, peft or accelerate releases.

Every trainer subpackage imports it first, before anything imports TRL, so an unsupported release fails
with one message (installed version, supported range, pip command) rather than deep inside TRL. The
range itself lives in :mod:`peft_ext._versions`; ``import trl_ext`` alone stays light and checks nothing.
"""

from peft_ext._versions import require_supported_versions

require_supported_versions(("trl", "transformers", "peft", "accelerate"), package="trl_ext")
