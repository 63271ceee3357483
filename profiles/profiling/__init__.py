"""Model profiling: compression ratios and accuracy sensitivity, written to a profile directory.

    from profiles.profiling import ProfileRequest, profile_model, read_profile
    result = profile_model(ProfileRequest(model="builtin", out=Path("prof")))
    prof = read_profile("prof")        # ModelProfile: .doc, .ratios, .sensitivity (DataFrames)

The directory format is documented in docs/model-profile.md, the commands in docs/profiling.md.
"""

from profiles.profiling.format import (KIND, SCHEMA_VERSION, ModelProfile, read_profile,
                                       read_profile_doc)
from profiles.profiling.grid import GridSpec, Point, build_points
from profiles.profiling.profiler import DEFAULT_LIMIT, ProfileRequest, ProfileResult, profile_model
from profiles.profiling.sensitivity import budget_warning

__all__ = ["DEFAULT_LIMIT", "KIND", "SCHEMA_VERSION", "GridSpec", "ModelProfile", "Point",
           "ProfileRequest", "ProfileResult", "budget_warning", "build_points", "profile_model",
           "read_profile", "read_profile_doc"]
