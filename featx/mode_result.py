"""One mode of a cut judged: the truncated model against the full model's value at the cut
(``ModeResult``: the difference, what raised or did not compare, the fresh input of a keep_glue module,
whether the comparison could fail and whether the model's output depends on the cut), and in a numeric
setting other than float32 eager the float64 judgement (``NumericResult``). ``featx.compare`` and
``featx.replay`` make a ``ModeResult``, ``featx.numeric_check`` its ``NumericResult``; each has
``to_dict()`` (the JSON contract in docs/json.md) and the sentences a report gives for it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from featx.vocab import Method, NumericVerdict


@dataclass(frozen=True)
class NumericResult:
    """One mode of a cut judged in a numeric setting other than float32 eager (``featx.numeric_check``):
    the tolerance of the dtype the forward computes in, and the errors of the full model and of the cut
    against the full model run in float64, in units of that tolerance (``error``: the largest
    ``|a - b| / (atol + rtol * |b|)`` over the elements, ``b`` the float64 value; 1 is the tolerance's edge)."""

    dtype: str  # the dtype the forward computes in (bfloat16 under CPU autocast)
    rtol: float
    atol: float
    model_error: float | None  # the full model in the setting against float64; None: not comparable
    cut_error: float | None  # the cut in the setting against the full model in float64
    factor: float  # faithful needs cut_relative_error <= factor * max(model_relative_error, the dtype's eps)
    float64_diff: float | None  # largest |cut - full| with both in float64 (0 for a faithful cut)
    verdict: NumericVerdict
    compiled: bool = False  # the cut ran compiled (torch.compile)
    # ||a - b|| / ||b|| against float64 over the whole value: what the factor judges
    model_relative_error: float | None = None
    cut_relative_error: float | None = None

    @property
    def ok(self) -> bool:
        return self.verdict == "faithful"

    def failure(self) -> str | None:
        """Why an otherwise equal cut is not faithful, without numbers; None when it is or it differs."""
        if self.verdict == "below_resolution":
            return (
                f"equal to the full model within {self.dtype}'s tolerance, but not in float64: a difference "
                f"below what {self.dtype} can show"
            )
        if self.verdict == "beyond_factor":
            return (
                f"further from the float64 full model than {self.factor:g} times the full model's own "
                f"{self.dtype} error"
            )
        if self.verdict == "no_float64":
            return (
                "the model or the cut does not run in float64, so there is no float64 reference to judge by"
            )
        return None

    def reason(self) -> str | None:
        """``failure`` with the numbers."""
        if self.verdict == "below_resolution":
            return (
                f"the truncated output equals the full model's within {self.dtype}'s tolerance (rtol "
                f"{self.rtol:g}, atol {self.atol:g}), but in float64 they differ by up to "
                f"{self.float64_diff:.6g}: a difference below what {self.dtype} can show"
            )
        if self.verdict == "beyond_factor":
            return (
                f"the truncated output's relative error against the float64 full model is "
                f"{_number(self.cut_relative_error)}, more than {self.factor:g} times the full model's own "
                f"{self.dtype} error ({_number(self.model_relative_error)}, at least {self.dtype}'s eps)"
            )
        if self.verdict == "no_float64":
            return self.failure()
        return None

    def to_dict(self) -> dict[str, object]:
        return {
            "dtype": self.dtype,
            "tolerance": {"rtol": self.rtol, "atol": self.atol},
            "model_error": self.model_error,
            "cut_error": self.cut_error,
            "model_relative_error": self.model_relative_error,
            "cut_relative_error": self.cut_relative_error,
            "factor": self.factor,
            "float64_max_abs_diff": self.float64_diff,
            "compiled": self.compiled,
            "verdict": self.verdict,
        }


def _number(value: float | None) -> str:
    return "not comparable" if value is None else f"{value:.3g}"


@dataclass(frozen=True)
class ModeResult:
    """The truncated model against the full model's value at the cut, in one mode."""

    max_abs_diff: float | None  # None when there is nothing to subtract (error, other shapes)
    equal: bool  # within atol/rtol; NaN and Inf never count as equal
    error: str | None = None  # what the truncated model raised
    mismatch: str | None = None  # why the outputs could not be compared value by value
    nonfinite: int = 0  # positions where either output is NaN or infinite
    method: Method = "run"  # run: the Sequential was executed; derived: follows from the recorded forward
    # keep_glue: the same module, after the comparison on the example input held, on a fresh input it was
    # not built with (other values, and another batch and spatial size where the model takes them); when
    # that one fails, the fields above are its own
    fresh: ModeResult | None = None
    fresh_shape: tuple[int, ...] | None = None  # the fresh input's shape (None: not one tensor)
    element: str | None = None  # in an output of several tensors, the one that differs most (``[1]``)
    # in a numeric setting other than float32 eager: the dtype's tolerance and the float64 errors
    numerics: NumericResult | None = None
    # whether the comparison sees a difference just above the tolerance (featx.sensitivity); None: not
    # checked (the comparison failed, or a sweep's); when False, ``blind`` says why it cannot
    sensitive: bool | None = None
    blind: str | None = None
    # whether the full model's output changes when the value at the cut does (featx.sensitivity.depends);
    # None: not checked, or it cannot be told (the cut's module never ran in this mode)
    output_depends_on_cut: bool | None = None

    @property
    def ok(self) -> bool:
        """Equal within the tolerance, nothing raised or mismatched, the comparison not blind, and in a
        numeric setting the float64 check passed."""
        return (
            self.equal
            and self.error is None
            and self.mismatch is None
            and self.sensitive is not False
            and (self.numerics is None or self.numerics.ok)
        )

    def with_fresh(self, fresh: ModeResult, shape: tuple[int, ...] | None) -> ModeResult:
        """This result (ok, on the input the module was built with) and ``fresh`` as one: ``fresh``'s fields
        where it fails, so every reader of them sees the failure; else the larger difference of the two."""
        if not fresh.ok:
            return replace(fresh, method=self.method, fresh=fresh, fresh_shape=shape)
        diffs = [d for d in (self.max_abs_diff, fresh.max_abs_diff) if d is not None]
        return replace(self, max_abs_diff=max(diffs, default=None), fresh=fresh, fresh_shape=shape)

    @property
    def failed_fresh(self) -> bool:
        """Right on the input the module was built with, wrong on a fresh one."""
        return self.fresh is not None and not self.fresh.ok

    def _on(self) -> str:
        if not self.failed_fresh:
            return ""
        shape = f" of shape {list(self.fresh_shape)}" if self.fresh_shape is not None else ""
        return f", on a fresh input{shape} (not the one the module was built with):"

    def reason(self, mode: str) -> str:
        """The sentence ``reasons`` gives for this result in ``mode`` when it is not ok."""
        head = f"in {mode} mode{self._on()} "
        if self.error is not None:
            return f"{head}the truncated model raised {self.error}"
        if self.mismatch is not None:
            return f"{head}{self.mismatch}"
        if self.nonfinite:
            return (
                f"{head}{self.nonfinite} values at the cut are NaN or infinite (they never count as equal)"
                + (f"; elsewhere they differ by up to {self.max_abs_diff:.6g}" if self.max_abs_diff else "")
            )
        numeric = self.numerics.reason() if self.numerics is not None and self.equal else None
        if numeric is not None:
            return f"{head}{numeric}"
        if self.sensitive is False:
            return f"{head}the comparison cannot fail, so it proves nothing: {self.blind}"
        at = f" (most at element {self.element})" if self.element else ""
        return (
            f"{head}the truncated output differs from the full model's by up to {self.max_abs_diff:.6g}{at}"
        )

    def failure(self) -> str:
        """What went wrong, without the mode and without the numbers that vary from cut to cut: what a
        sweep groups its cuts by."""
        on = "on a fresh input (not the one the module was built with): " if self.failed_fresh else ""
        if self.error is not None:
            return f"{on}the truncated model raised {self.error}"
        if self.mismatch is not None:
            return f"{on}{self.mismatch}"
        if self.nonfinite:
            return f"{on}values at the cut are NaN or infinite (they never count as equal)"
        numeric = self.numerics.failure() if self.numerics is not None and self.equal else None
        if numeric is not None:
            return f"{on}{numeric}"
        if self.sensitive is False:
            return f"{on}the comparison cannot fail, so it proves nothing: {self.blind}"
        return f"{on}the truncated output differs from the full model's (max abs diff in the table)"

    def to_dict(self, keep_glue: bool = False) -> dict[str, object]:
        """With ``keep_glue`` (a keep_glue module's result) also ``fresh``: the comparison on the fresh
        input with its ``input_shape``, or None where none ran (the example input already differed)."""
        out: dict[str, object] = {
            "max_abs_diff": self.max_abs_diff,  # over positions finite in both outputs
            "equal": self.equal,
            "error": self.error,
            "mismatch": self.mismatch,
            "nonfinite": self.nonfinite,
            "method": self.method,
            "numerics": self.numerics.to_dict() if self.numerics is not None else None,
            "sensitive": self.sensitive,
            "output_depends_on_cut": self.output_depends_on_cut,
        }
        if keep_glue:
            out["fresh"] = None
            if self.fresh is not None:
                shape = list(self.fresh_shape) if self.fresh_shape is not None else None
                fresh = {
                    k: v
                    for k, v in self.fresh.to_dict().items()
                    if k not in ("method", "numerics", "output_depends_on_cut")
                }
                out["fresh"] = {"input_shape": shape, **fresh}
        return out
