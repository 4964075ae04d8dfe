"""`python -m launch ...` is `scaler ...`."""

from launch.cli import main

if __name__ == "__main__":
  main()
