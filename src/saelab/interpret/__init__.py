"""Interpretation of SAE features. The feature scan over held-out contexts (`scan`, fed by
`sources`, sampling from `sampling`), the logit lens (`lens`), ablated text (`ablate`) and
embedding-space token lists and definition trees (`embedding`), with token strings and masks
(`vocab`). `report.build_report` puts them together into a typed `schema.Report` (its JSON form
comes from `records`), and `dashboard.write_dashboard` writes it as static HTML plus JSON.
Nothing is imported here: the renderer stays torch-free."""
