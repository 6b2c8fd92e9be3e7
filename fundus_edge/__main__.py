"""``python -m fundus_edge`` = ``fundus-edge``."""

from fundus_edge.cli import main

if __name__ == "__main__":
    main()
