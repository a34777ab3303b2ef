"""Verifiers: a math grader that cannot hang, an isolated code sandbox, and MiMo's Test-Difficulty-Driven Reward."""

from thinkforge.verify.grader import (
    AnswerFormat,
    MathGrader,
    choice_equal,
    default_grader,
    extract_answer,
    extract_boxed,
    extract_choice,
    math_equal,
)
from thinkforge.verify.sandbox import (
    STATUSES,
    SandboxInfo,
    SandboxUnavailable,
    TestResult,
    require_sandbox,
    run_code,
    run_code_batch,
    sandbox_info,
    sandbox_metadata,
)
from thinkforge.verify.tddr import difficulty_levels, tddr_reward

__all__ = [
    "STATUSES", "MathGrader", "SandboxInfo", "TestResult", "choice_equal", "default_grader", "difficulty_levels",
    "extract_boxed", "extract_choice", "math_equal", "run_code", "run_code_batch", "sandbox_info", "tddr_reward",
    "SandboxUnavailable", "require_sandbox", "sandbox_metadata", "AnswerFormat", "extract_answer",
]
