import os

from hypothesis import settings

# The default profile draws the same examples on every run, so that CI's verdict depends on the code, not
# on luck; HYPOTHESIS_PROFILE=stress explores with many more examples, freshly drawn each time.
settings.register_profile("default", max_examples=300, deadline=None, derandomize=True)
settings.register_profile("stress", max_examples=5000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
