#!/usr/bin/env bash
# Checks that the modules of src/ use each other without a cycle (issue 11: "no cycles").
#   bash tests/module_graph.sh
# A top-level module is src/<name>.rs or src/<name>/ (its submodules count as part of it); a
# dependency is a `crate::<module>` path (or `crate::{<module>, ...}`) in code: comments are
# left out, and the crate root (src/lib.rs) is not a module. Prints the graph, one line per
# module with what it uses, and exits 1 with the cycle if there is one.
set -euo pipefail
cd "$(dirname "$0")/.."

modules=()
for path in src/*.rs src/*/; do
  name=$(basename "$path" .rs)
  [ "$name" = lib ] && continue
  modules+=("$name")
done

# One "module dependency" line per `crate::` path in the code of each module.
edges() {
  local module file
  for module in "${modules[@]}"; do
    local files=()
    if [ -f "src/$module.rs" ]; then files+=("src/$module.rs"); fi
    if [ -d "src/$module" ]; then
      mapfile -t -O "${#files[@]}" files < <(find "src/$module" -name '*.rs' | sort)
    fi
    for file in "${files[@]}"; do
      perl -e '
        my ($m, $file) = @ARGV;
        open my $fh, "<", $file or die "$file: $!";
        local $_ = do { local $/; <$fh> };
        s{("(?:\\.|[^"\\])*")|//[^\n]*|/\*.*?\*/}{defined $1 ? $1 : ""}gse;
        print "$m $1\n" while /\bcrate::([A-Za-z_]\w*)/g;
        while (/\bcrate::\{([^}]*)\}/g) {
          print "$m $_\n" for map { /^\s*([A-Za-z_]\w*)/ ? $1 : () } split /,/, $1;
        }
      ' "$module" "$file"
    done
  done
}

edges | perl -e '
  my %is_module = map { $_ => 1 } @ARGV;
  my %deps;
  $deps{$_} = {} for @ARGV;
  while (<STDIN>) {
    my ($from, $to) = split;
    next if $from eq $to or !$is_module{$to};   # itself, or an item of the crate root
    $deps{$from}{$to} = 1;
  }
  for my $m (sort keys %deps) {
    my @d = sort keys %{ $deps{$m} };
    print "$m:", (@d ? " @d" : " (none)"), "\n";
  }
  # Depth-first search; a module met again while still on the path closes a cycle.
  my (%state, @path);
  sub visit {
    my ($m) = @_;
    $state{$m} = 1;
    push @path, $m;
    for my $d (sort keys %{ $deps{$m} }) {
      if (($state{$d} // 0) == 1) {
        my ($i) = grep { $path[$_] eq $d } 0 .. $#path;
        print "cycle: ", join(" -> ", @path[$i .. $#path], $d), "\n";
        exit 1;
      }
      visit($d) unless $state{$d};
    }
    pop @path;
    $state{$m} = 2;
  }
  for my $m (sort keys %deps) { visit($m) unless $state{$m} }
  print "no cycle\n";
' "${modules[@]}"
