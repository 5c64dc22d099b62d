"""`python -m stages.card vendor --vega X.tgz --vega-lite Y.tgz --vega-embed Z.tgz`: rebuild the offline
page template of `dvc plots show` (.dvc/plots/offline.html) from npm tarballs (see plots.py)."""

from stages.card.plots import main

if __name__ == "__main__":
    raise SystemExit(main())
