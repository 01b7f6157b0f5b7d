import os

from hypothesis import settings

# HYPOTHESIS_PROFILE=stress runs the property tests with many more examples.
settings.register_profile("default", max_examples=300, deadline=None)
settings.register_profile("stress", max_examples=5000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
