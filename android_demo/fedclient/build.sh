#!/usr/bin/env bash
# Build and test the Java protocol client with javac and JUnit 5's console launcher (no Gradle).
#
#   bash android_demo/fedclient/build.sh          # compile, package build/fedclient.jar
#   bash android_demo/fedclient/build.sh test     # ...then run the JUnit tests
#   bash android_demo/fedclient/build.sh classpath  # print the runtime class path (for java -cp)
#   bash android_demo/fedclient/build.sh clean
#
# Needs JDK 17+ and two Debian packages: apt-get install -y junit5 libandroid-json-java
# (override the jar paths with ANDROID_JSON_JAR / JUNIT_JAR). Output goes to build/ (gitignored).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
OUT="$HERE/build"
JSON_JAR="${ANDROID_JSON_JAR:-}"
if [ -z "$JSON_JAR" ]; then
  for candidate in /usr/share/java/android-json.jar /usr/share/java/com.android.json.jar; do
    [ -f "$candidate" ] && JSON_JAR="$candidate" && break
  done
fi
JUNIT_JAR="${JUNIT_JAR:-/usr/share/java/junit-platform-console-standalone.jar}"

need() {  # need FILE PACKAGE
  if [ -z "$1" ] || [ ! -f "$1" ]; then
    echo "fedclient: ${1:-a jar} is missing; install it with: apt-get install -y $2" >&2
    exit 3
  fi
}

compile_main() {
  command -v javac >/dev/null || { echo "fedclient: javac not found (install a JDK 17+)" >&2; exit 3; }
  need "$JSON_JAR" libandroid-json-java
  rm -rf "$OUT/classes"
  mkdir -p "$OUT/classes"
  find "$HERE/src/main/java" -name '*.java' > "$OUT/main-sources.txt"
  javac --release 17 -Xlint:all -Werror -encoding UTF-8 -cp "$JSON_JAR" -d "$OUT/classes" @"$OUT/main-sources.txt"
  cp -r "$HERE/src/main/resources/." "$OUT/classes/"
  jar --create --file "$OUT/fedclient.jar" -C "$OUT/classes" .
}

compile_tests() {
  need "$JUNIT_JAR" junit5
  rm -rf "$OUT/test-classes"
  mkdir -p "$OUT/test-classes"
  find "$HERE/src/test/java" -name '*.java' > "$OUT/test-sources.txt"
  javac --release 17 -Xlint:all -Xlint:-try -Werror -encoding UTF-8 -cp "$OUT/fedclient.jar:$JSON_JAR:$JUNIT_JAR" \
    -d "$OUT/test-classes" @"$OUT/test-sources.txt"
  cp -r "$HERE/src/test/resources/." "$OUT/test-classes/"
}

case "${1:-build}" in
  build)
    compile_main
    echo "fedclient: built $OUT/fedclient.jar"
    ;;
  test)
    compile_main
    compile_tests
    java -Dfedfleet.golden="$REPO/tests/golden" -jar "$JUNIT_JAR" \
      --class-path "$OUT/test-classes:$OUT/fedclient.jar:$JSON_JAR" \
      --scan-class-path "$OUT/test-classes" --disable-banner --details=summary --fail-if-no-tests
    ;;
  classpath)
    need "$JSON_JAR" libandroid-json-java
    echo "$OUT/fedclient.jar:$JSON_JAR"
    ;;
  clean)
    rm -rf "$OUT"
    ;;
  *)
    echo "usage: build.sh [build|test|classpath|clean]" >&2
    exit 2
    ;;
esac
