# The stackd Python application, built from the repository's pyproject.toml.
{
  lib,
  python3Packages,
  installShellFiles,
}:
let
  root = ../..;
  pyproject = builtins.fromTOML (builtins.readFile (root + "/pyproject.toml"));
in
python3Packages.buildPythonApplication {
  pname = "stackd";
  inherit (pyproject.project) version;
  pyproject = true;

  src = lib.cleanSourceWith {
    src = root;
    filter =
      path: _type:
      let
        rel = lib.removePrefix (toString root + "/") (toString path);
      in
      lib.any (prefix: rel == prefix || lib.hasPrefix (prefix + "/") rel) [
        "pyproject.toml"
        "README.md"
        "stackd"
        "man"
        "contrib"
      ];
  };

  build-system = [ python3Packages.setuptools ];

  # Keep in step with [project] dependencies (tests/unit/test_nix.py compares the two).
  dependencies = with python3Packages; [
    dbus-fast
    pydantic
    structlog
    jeepney
    asyncinotify
  ];

  nativeBuildInputs = [ installShellFiles ];

  postInstall = ''
    installManPage man/stackd.1
    install -Dm644 contrib/systemd/stackd.catalog $out/lib/systemd/catalog/stackd.catalog
    for shell in bash zsh fish; do
      $out/bin/stackd completion $shell > stackd.$shell
    done
    installShellCompletion stackd.bash stackd.zsh stackd.fish
  '';

  # The test suite needs root and a real systemd user manager (tests/sandbox.py).
  doCheck = false;
  pythonImportsCheck = [ "stackd.cli" ];

  meta = {
    description = "Run docker/podman compose stacks as systemd user services, ownership verified";
    license = lib.licenses.mit;
    platforms = lib.platforms.linux;
    mainProgram = "stackd";
  };
}
