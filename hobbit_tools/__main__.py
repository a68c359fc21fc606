"""`python -m hobbit_tools ...` is `hobbit ...`."""

from .cli import main

main(prog_name="hobbit")
