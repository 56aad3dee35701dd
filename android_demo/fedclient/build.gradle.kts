// The protocol client: plain Java 17, no Android classes. On a phone, org.json comes from the
// platform; on the JVM from the same API packaged as android-json (Debian: libandroid-json-java).
// Without Gradle, fedclient/build.sh builds and tests the same sources with javac and JUnit.
plugins {
    `java-library`
}

java {
    sourceCompatibility = JavaVersion.VERSION_17
    targetCompatibility = JavaVersion.VERSION_17
}

dependencies {
    compileOnly("com.vaadin.external.google:android-json:0.0.20131108.vaadin1")
    testImplementation("com.vaadin.external.google:android-json:0.0.20131108.vaadin1")
    testImplementation(platform("org.junit:junit-bom:5.11.3"))
    testImplementation("org.junit.jupiter:junit-jupiter")
    testRuntimeOnly("org.junit.platform:junit-platform-launcher")
}

tasks.test {
    useJUnitPlatform()
    systemProperty("fedfleet.golden", rootDir.resolve("../tests/golden").absolutePath)
}
