"""Pendra's console: the pages a person uses in a browser (Overview, Models, Playground), served by
the API gateway and by `pendra serve` from the files in this package (Jinja templates, a
stylesheet, htmx and one script of Pendra's own; nothing from a CDN, no build step). The routes
are in `routes`, what the pages show in `views`, what they learn of the inference side in
`system`."""
