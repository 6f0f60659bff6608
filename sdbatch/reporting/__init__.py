"""The report: `write` reads evaluated outputs (`runs`) and writes one self-contained HTML page and
Markdown; `summary` holds the words and tables, `plots` and `grids` the figures, `render` turns
`parts` into HTML and Markdown."""
