"""The shapes world and the builtin models made from it: `world` renders and judges scenes,
`components` are the models' parts, `train` trains toy and toy-clip, `build` writes every builtin
model's shipped files."""
