"""Hospital-site evaluation: model bundles (`medtta export`) and evaluation on a site's own scans
(`medtta site-eval`), offline and without writing under the input."""
